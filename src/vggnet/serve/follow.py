"""Serving what a model registry says: ``vggnet serve --registry URI --model M`` (issue 31).

The serve room imports no registry: the CLI hands a plain callable in (``source``) that reads the registry and
answers a :class:`Wanted` (which versions, their files and sha256, the default version, the challenger's
shadow or A/B share). :class:`RegistryFollower` polls it on a thread and, when the answer differs from what is
served, builds a :class:`~vggnet.serve.repository.ModelConfig` in memory and asks
:meth:`ModelServer.replace_model <vggnet.serve.lifecycle.ModelServer.replace_model>` for the swap: the new
version loads and warms beside the old, takes the traffic, then the old one is drained and closed, so no request
fails during a swap.

Choices, and why:

* **Unchanged versions are kept, not reloaded** (same version, same file, same sha256 as when loaded; the
  server carries a READY version over as it is). Promoting the challenger that already runs in shadow is then
  an instant re-routing with no second copy in memory, and changing the mode (shadow / A/B) reloads nothing.
* **A version that fails to load** (file missing, sha256 not the registry's, file corrupt) leaves the old one
  serving; the reason is in ``/v2/repository/index`` and the log. It is **not retried on every poll**: the
  follower remembers the registry state it last acted on and tries again only when that state changes (an
  alias moves, the mode changes, a version's file or hash changes). Hashing and loading a broken file every few
  seconds would cost I/O and bury the log for nothing; a file repaired in place is picked up by changing the
  registry (register it again) or by a restart.
* **The champion decides**: if the champion's version fails, nothing changes (the previous champion and
  challenger keep serving); if only the challenger fails, the champion is served without it.
* **The registry unreachable** (or answering something unservable, e.g. no champion) during a poll: the server
  keeps serving what it has, logs one warning per outage and one line when the registry is back, and counts
  every poll in ``vggnet_registry_polls_total{outcome}``. At startup the same is the CLI's one-line error.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter

from vggnet.atomic import file_sha256
from vggnet.errors import UsageError

from .errors import ServeError
from .repository import ModelConfig, ModelRepository
from .versions import ModelVersion

if TYPE_CHECKING:
    from .lifecycle import ModelServer

__all__ = ["POLL_OUTCOMES", "SWAP_OUTCOMES", "RegistryFollower", "Wanted", "WantedVersion", "check_file"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a served name is a URL path segment (repository's rule)
#: ok: read; unreachable: the read raised (kept serving); invalid: the registry answered something unservable
POLL_OUTCOMES = ("ok", "unreachable", "invalid")
#: done: the new state serves; partial: served without a challenger that failed; failed: nothing changed
SWAP_OUTCOMES = ("done", "partial", "failed")


@dataclass(frozen=True)
class WantedVersion:
    """One version's file and the sha256 the registry recorded for it (None: not checked)."""

    file: Path
    sha256: str | None = None


@dataclass(frozen=True)
class Wanted:
    """What should be served under ``name``: ``versions`` (version → file), the ``default`` one (the champion),
    and the others as ``shadow`` versions or in the ``ab`` split. Compared with ``==`` from poll to poll."""

    name: str
    default: str
    versions: dict[str, WantedVersion]
    shadow: tuple[str, ...] = ()
    ab: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, champion: tuple[str, str | Path, str | None],
           challenger: tuple[str, str | Path, str | None] | None = None, ab_share: float | None = None) -> Wanted:
        """The champion ``(version, file, sha256)`` as the default version and, if given, the challenger in
        shadow (``ab_share`` None) or answering ``ab_share`` of the requests that name no version."""
        if not _NAME.match(name):
            raise UsageError(f"registered model {name!r} cannot be served under that name: a served name is "
                             "letters, digits and . _ - (not starting with . _ -)")
        versions = {str(champion[0]): WantedVersion(Path(champion[1]), champion[2] or None)}
        if challenger is None or str(challenger[0]) in versions:
            return cls(name, str(champion[0]), versions)
        other = str(challenger[0])
        versions[other] = WantedVersion(Path(challenger[1]), challenger[2] or None)
        if ab_share is None:
            return cls(name, str(champion[0]), versions, shadow=(other,))
        if not 0 < ab_share < 1:
            raise UsageError(f"the challenger's A/B share must be between 0 and 1, got {ab_share}")
        return cls(name, str(champion[0]), versions, ab={str(champion[0]): 1 - ab_share, other: ab_share})

    def only(self, keep: Iterable[str]) -> Wanted:
        """This state restricted to ``keep`` (the default version always stays)."""
        keep = set(keep) | {self.default}
        ab = {v: w for v, w in self.ab.items() if v in keep}
        return Wanted(self.name, self.default, {v: f for v, f in self.versions.items() if v in keep},
                      tuple(v for v in self.shadow if v in keep), ab if len(ab) > 1 else {})

    def config(self) -> ModelConfig:
        """The in-memory model configuration the server swaps to (batching and runtime: the server's)."""
        return ModelConfig(name=self.name, versions={v: wv.file for v, wv in self.versions.items()},
                           default_version=self.default, ab=dict(self.ab), shadow=self.shadow)

    def describe(self) -> str:
        """E.g. ``version 3 (default), 4 in shadow`` or ``versions 3 (90 %), 4 (10 %)``."""
        if self.ab:
            return "versions " + ", ".join(f"{v} ({100 * w / sum(self.ab.values()):.0f} %)"
                                           for v, w in self.ab.items())
        return f"version {self.default} (default)" + "".join(f", {v} in shadow" for v in self.shadow)



def check_file(version: str, wanted: WantedVersion) -> None:
    """UsageError unless ``wanted.file`` is there and has the registry's sha256: a file replaced or damaged since
    it was registered is not what the registry's evidence (metrics, promotion) was about."""
    if not wanted.file.is_file():
        raise UsageError(f"version {version}: checkpoint {wanted.file} not found")
    if wanted.sha256:
        digest = file_sha256(wanted.file)
        if digest != wanted.sha256:
            raise UsageError(f"version {version}: {wanted.file.name} has sha256 {digest[:12]}..., the registry "
                             f"recorded {wanted.sha256[:12]}...: the file changed or was damaged since it was "
                             "registered")


class RegistryFollower:
    """Polls ``source`` every ``poll_s`` seconds and swaps what the server serves when its answer changes (see
    the module's text for the rules). A :class:`~vggnet.serve.lifecycle.Background` of the app's lifespan."""

    def __init__(self, source: Callable[[], Wanted], poll_s: float = 10.0, where: str = "") -> None:
        if poll_s <= 0:
            raise UsageError(f"the registry poll interval must be positive, got {poll_s}")
        self.source, self.poll_s = source, poll_s
        self.where = where  # the registry's address, for the log (no password)
        #: what serves now (as the follower last applied it)
        self.applied: Wanted | None = None
        #: the registry state last acted on: not tried again until the registry says something else
        self.attempted: Wanted | None = None
        self.server: ModelServer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trouble: str | None = None  # the outcome of the current outage, None while the registry answers
        self._failed_polls = 0

    def first(self) -> ModelRepository:
        """The repository the server starts with: the registry's champion alone, its file checked now (missing,
        or not the registered sha256: a UsageError, the CLI's one line). The source's own errors (unreachable,
        no champion) propagate. The challenger comes with the first poll, once the champion serves, through the
        same path as every later change."""
        wanted = self.source()
        try:
            check_file(wanted.default, wanted.versions[wanted.default])
        except UsageError as exc:
            raise UsageError(f"{wanted.name}@champion cannot be served: {exc}") from None
        self.applied = wanted.only(())
        return ModelRepository({wanted.name: self.applied.config()})

    # --- Background -----------------------------------------------------------------------------------------

    def start(self, server: ModelServer) -> None:
        self.server = server
        registry = server.metrics.registry
        self.polls = Counter("vggnet_registry_polls", "Reads of the model registry (vggnet serve --registry) by "
                             "outcome: ok, unreachable or invalid (no champion, a bad mode tag); the server keeps "
                             "serving what it has on the last two", ["outcome"], registry=registry)
        self.swaps = Counter("vggnet_registry_swaps", "Changes of what is served taken from the registry: done, "
                             "partial (a challenger that failed to load left out) or failed (nothing changed; the "
                             "reason is in /v2/repository/index)", ["outcome"], registry=registry)
        for outcome in POLL_OUTCOMES:
            self.polls.labels(outcome)
        for outcome in SWAP_OUTCOMES:
            self.swaps.labels(outcome)
        self._thread = threading.Thread(target=self._run, name="registry-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        assert self.server is not None
        self.server.wait_loaded()  # the champion first; then at once the first poll (the challenger, if any)
        while not self._stop.is_set():
            try:
                self.poll()
            except ServeError as exc:  # the server is shutting down, or a load through the API holds it
                if self.server.closing:
                    return
                log.warning("registry follower: %s; trying again in %g s", exc.message, self.poll_s)
                self.attempted = None
            except Exception:  # a bug: logged with its traceback, the server keeps serving
                log.exception("registry follower: unexpected error; still serving, next poll in %g s", self.poll_s)
            if self._stop.wait(self.poll_s):
                return

    # --- one poll ---------------------------------------------------------------------------------------------

    def poll(self) -> None:
        """Read the registry once and act on what changed (blocking: a swap loads and drains)."""
        try:
            wanted = self.source()
        except Exception as exc:  # whatever the client raises: a registry that is down must not stop serving
            self._outage("invalid" if isinstance(exc, UsageError) else "unreachable", exc)
            return
        if self._trouble is not None:
            log.info("model registry answers again (after %d failed polls)", self._failed_polls)
            self._trouble, self._failed_polls = None, 0
        self.polls.labels("ok").inc()
        if wanted == self.applied and wanted != self.attempted:  # back to what serves: old failures are moot
            self.attempted = wanted
            self._forget_failures(wanted.name)
        if wanted in (self.applied, self.attempted):
            return
        self.attempted = wanted
        self.apply(wanted)

    def _outage(self, outcome: str, exc: Exception) -> None:
        self.polls.labels(outcome).inc()
        self._failed_polls += 1
        if self._trouble != outcome:  # once per outage, not once per poll
            what = "unreachable" if outcome == "unreachable" else "answers with nothing servable"
            log.warning("model registry %s%s (%s: %s); still serving %s, polling every %g s",
                        f"{self.where} " if self.where else "", what,
                        type(exc).__name__, " ".join(str(exc).split())[:300],
                        self.applied.describe() if self.applied else "what was loaded", self.poll_s)
            self._trouble = outcome

    def _forget_failures(self, name: str) -> None:
        assert self.server is not None
        model = self.server.models.get(name)
        if model is not None:
            model.failed = {}

    def apply(self, wanted: Wanted) -> None:
        """Swap to ``wanted``: unchanged versions kept, new ones loaded beside and checked against the registry's
        sha256, the champion required, a failed challenger left out."""
        assert self.server is not None
        before = self.applied
        keep = [v for v, wv in wanted.versions.items() if before is not None and before.versions.get(v) == wv]
        log.info("model %s: the registry now wants %s (serving %s)", wanted.name, wanted.describe(),
                 before.describe() if before else "nothing")

        def verify(mv: ModelVersion) -> None:
            if mv.version in wanted.versions:
                check_file(mv.version, wanted.versions[mv.version])

        result = self.server.replace_model(
            wanted.config(), keep=keep, optional=[v for v in wanted.versions if v != wanted.default], verify=verify,
            remember_failed=True, reason=f"replaced: the registry wants {wanted.describe()}")
        reasons = "; ".join(f"version {mv.version}: {mv.reason}" for mv in result.failed)
        if not result.served:
            self.swaps.labels("failed").inc()
            log.error("model %s: kept serving %s; the registry's %s did not load (%s); not retried until the "
                      "registry changes", wanted.name, before.describe() if before else "nothing",
                      wanted.describe(), reasons)
            return
        failed = {mv.version for mv in result.failed}
        self.applied = wanted.only(v for v in wanted.versions if v not in failed)
        self.swaps.labels("partial" if failed else "done").inc()
        if failed:
            log.error("model %s: serving %s without the challenger, which did not load (%s); not retried until the "
                      "registry changes", wanted.name, self.applied.describe(), reasons)
        else:
            log.info("model %s: serving %s", wanted.name, self.applied.describe())
