"""``vggnet serve``: an HTTP inference server (Open Inference Protocol V2 + /predict) with dynamic batching.

Serves checkpoints (with a runtime of ``vggnet predict``) and files written by ``vggnet export``, which run as
exported: no runtime choice and no calibration images (an INT8 export is calibrated already).
"""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING, Any

from vggnet.errors import UsageError

if TYPE_CHECKING:  # the serve extra (FastAPI...) is imported only when the command runs, not for --help
    from vggnet.serve.repository import ModelRepository
    from vggnet.serve.settings import ServeSettings

EPILOG = """\
model repository layout (--model-repo DIR):
  DIR/<model>/<version>/       a run folder (best.safetensors, else last.safetensors), one .safetensors, or
                               one exported file (.onnx, .int8.onnx, .pt2, .int8.pt2, TorchScript .pt)
  DIR/<model>/config.yaml      optional: name, default_version, ab: {"1": 0.9, "2": 0.1}, max_batch_size,
                               max_delay_ms, batching, max_queue, runtime, calib_data
  --ckpt RUN serves one checkpoint as model <run folder name>, version 1; --ckpt m.int8.onnx one exported
  file as model m.int8.

following the model registry (--registry [URI] --model M; vggnet registry):
  M@champion is served as model M, version <its registry version>, the default; M@challenger, when aliased,
  runs in shadow (its predictions stored beside the champion's with --store) or answers an A/B share, as
  `vggnet registry mode M shadow|ab:W` says. Every --registry-poll-s seconds the registry is read; a change is
  loaded and warmed beside the running versions, takes the traffic, then the old version is drained and closed:
  no request fails. A version whose file is missing, not the registered sha256, or does not load leaves the old
  one serving (the reason in /v2/repository/index and the log) and is not retried until the registry changes.
  Unreachable registry: the server keeps serving (vggnet_registry_polls_total{outcome="unreachable"}).

calibration images (runtimes int8, onnx-int8, openvino-int8, auto; the rule of vggnet predict and export too):
  the model's calib_data (in its config.yaml, relative to the model folder) or --calib-data PATH (a folder,
  glob or file of training images) when given; else the training split of the version's run, rebuilt from
  its recipe.yaml as vggnet eval does (the embedded digits for the demo, the ImageFolder tree it names...;
  never its validation split); else an error before the server starts: a checkpoint outside a run folder
  needs one of them. --calib-n of them (default 64), spread evenly; the log says where they came from.

exported files (vggnet export):
  served as they are, on the CPU, INT8 ones included: the preprocessing, and an INT8 file's calibration, are
  inside the file, so --runtime must stay eager (the default), --device cpu and --precision fp32 (the defaults),
  and no --calib-data is needed. ONNX runs in ONNX Runtime and runs no code from the file; .pt2 (a compiled
  shared library) and TorchScript (a program) do, and load only with --trust-model-code.

routes:
  GET  /v2/health/live, /v2/health/ready, /v2/models/NAME[/versions/V][/ready|/config], /metrics
  POST /v2/models/NAME[/versions/V]/infer   V2 JSON (or binary) tensors: input FP32 [N,C,S,S], normalised,
                                            or UINT8 image pixels [N,H,W,C] / [N,C,H,W], preprocessed by the server
  POST /v2/repository/index                 the models and versions, with their state
  POST /v2/repository/models/NAME/load|unload   reload a model from disk / stop serving it (needs the API key
                                            when --api-key-file is set; refused from another site's web page)
  POST /predict?model=NAME&topk=5           an image (multipart or raw body) -> top-k labels

examples:
  vggnet serve --ckpt runs/cifar10 --port 8000
  curl -s -X POST --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'localhost:8000/predict?topk=3'
  vggnet serve --model-repo models/ --host 0.0.0.0 --max-batch-size 32 --max-delay-ms 10
  vggnet serve --model-repo models/ --host 0.0.0.0 --allowed-hosts models.example.com,10.0.0.5 --api-key-file keys
  vggnet serve --ckpt runs/demo --runtime int8            # calibrated on the run's own training split
  vggnet serve --ckpt runs/cifar10 --runtime auto --calib-data data/cifar10/train --calib-n 128
  vggnet export --ckpt runs/cifar10 --format onnx-int8 --out models/cifar10/2/model.int8.onnx
  vggnet serve --ckpt models/cifar10/2/model.int8.onnx
  vggnet serve --ckpt runs/cifar10 --device cuda --precision bf16      # checkpoints, eager runtime only
  vggnet serve --registry --model digits --store sqlite:///runs/serve.db   # runs/mlruns/mlflow.db, champion
  vggnet registry promote digits --version 2 --force --reason "hotfix"      # ...served within a poll
"""


_CALIBRATED = ("int8", "onnx-int8", "openvino-int8", "auto")
DEFAULT_POLL_S = 10.0  # --registry-poll-s
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # vggnet.hardware.PRECISIONS, without importing torch for --help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP inference server: Open Inference Protocol (V2), dynamic batching, A/B versions, /metrics",
        description=textwrap.fill(
            "Serve checkpoints over HTTP with uvicorn: the Open Inference Protocol (V2) that Triton and KServe "
            "clients speak, a /predict route for image uploads, dynamic batching (one worker per model), "
            "weighted A/B routing between versions, Prometheus /metrics and input limits. SIGTERM drains "
            "the queues before exiting.", width=100),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_flags(p)
    p.add_argument("--runtime", default=None,
                   help="inference runtime: eager (default), channels_last, bf16, compile, int8, int8-dynamic, onnx, "
                        "onnx-int8, openvino, openvino-int8 or auto (see vggnet predict --help); a model's config.yaml "
                        "may set its own. Checkpoints only: exported files run as exported")
    p.add_argument("--device", metavar="D",
                   help="cpu (default), cuda or cuda:N: where checkpoints run (eager runtime only; a CUDA device "
                   "that is not there is an error before the server starts)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast for checkpoints on --device: fp32 (default), bf16, fp16 (CUDA only) or auto")
    p.add_argument("--calib-data", metavar="PATH",
                   help="calibration images (folder, glob or file) for int8, onnx-int8, openvino-int8 and auto: "
                   "training images (default: the training split of each checkpoint's run, from its recipe.yaml; "
                   "needed for a checkpoint outside a run folder; not needed for exported INT8 files, calibrated at "
                   "export)")
    p.add_argument("--calib-n", type=int, metavar="N",
                   help="calibration images, spread evenly over --calib-data or the run's training split "
                   "(default: 64)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--allowed-hosts", metavar="HOSTS",
                   help="Host header values answered besides --host's own (a loopback --host adds localhost, "
                   "127.0.0.1 and [::1]): names or addresses, *.example.com patterns, comma-separated; others get "
                   "400 (stops DNS rebinding). '*': any host. Default: --host's own names; with --host 0.0.0.0 "
                   "or :: any host, with a warning")
    p.add_argument("--docs", action="store_true", default=None,
                   help="serve FastAPI's /docs (Swagger UI) and /redoc: off by default because their scripts load "
                   "from a CDN (cdn.jsdelivr.net) and run with this server's origin; /openapi.json is always served")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--max-batch-size", type=int, help="rows per forward pass and per request (default: 16)")
    p.add_argument("--max-delay-ms", type=float, help="how long a request waits for others to batch with (default: 5)")
    p.add_argument("--no-batching", dest="batching", action="store_false", default=None,
                   help="one request per forward pass (the baseline; still one worker per model)")
    p.add_argument("--max-queue", type=int, help="rows waiting per model before 503 (default: 256)")
    p.add_argument("--max-body-mb", type=float, help="largest request body in MiB, after decompression (default: 32)")
    p.add_argument("--max-image-pixels", type=int, help="largest uploaded image in pixels (default: 36000000)")
    p.add_argument("--request-timeout", type=float, help="seconds a request waits for its result (default: 30)")
    p.add_argument("--drain-timeout", type=float, help="seconds shutdown waits for queued requests (default: 30)")
    p.add_argument("--max-concurrency", type=int, help="request bodies received or decoded at once; beyond it 503 "
                   "before the body is read (bounds memory under a storm of uploads; 0: no bound; default: 16)")
    p.add_argument("--body-timeout", type=float, help="seconds a client may take to send a body, then 408 "
                   "(default: 30)")
    p.add_argument("--decode-threads", type=int, help="threads that parse and decode request bodies, at a lower "
                   "OS priority than the event loop so health probes stay fast (0: one per core; default: 0)")
    p.add_argument("--max-explain-jobs", type=int, help="Grad-CAM requests (POST /explain, the web page's overlay) "
                   "queued or running at once per model version; beyond it 503 (each costs a backward pass; "
                   "default: 2)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, = the cores)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                   help="skip the warm-up forward passes at load time")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", default=None,
                   help="no JSON access-log line per request")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="require Authorization: Bearer <key> with a key from FILE (one per line, >= 16 characters); "
                   "tokens travel in clear text: put TLS in front")
    p.add_argument("--public-endpoints", default="health,metrics", metavar="GROUPS",
                   help="with --api-key-file, endpoint groups left open: health, metrics, metadata, comma-separated, "
                   "or none (default: health,metrics)")
    p.add_argument("--trust-model-code", action="store_true", default=None,
                   help="allow exported files that run code from the file when loaded: .pt2 (a compiled shared "
                   "library) and TorchScript; ONNX needs no trust")
    p.add_argument("--store", metavar="URL",
                   help="keep every prediction in a database (SQLAlchemy URL: sqlite:///runs/serve.db on one machine, "
                   "postgresql+psycopg://user@host/db for several replicas; needs the store extra); writes are "
                   "batched off the request path and a store that is down drops rows, never predictions")
    p.add_argument("--store-keep-days", type=float, metavar="DAYS",
                   help="with --store, remove predictions older than DAYS when the server starts (default: keep)")
    p.add_argument("--live-accuracy-every", type=float, metavar="S",
                   help="with --store, seconds between reads of each version's live accuracy from the store into "
                   "vggnet_live_accuracy{model,version} (the reviewed random sample; 0: off; default: 30)")
    p.add_argument("--review-sample", type=float, metavar="P",
                   help="share of predictions marked, uniformly at random, for human review: the unbiased basis of "
                   "live accuracy (default: 0.1)")
    p.add_argument("--keep-inputs", metavar="DIR",
                   help="with --store, keep the crop the network saw (a PNG) of the review sample's and low-"
                   "confidence predictions in DIR, named by the input's SHA-256, for reviewers (off: these are "
                   "your users' images)")
    p.add_argument("--keep-all-inputs", action="store_true", default=None,
                   help="with --keep-inputs, keep the crop of every prediction, not only those likely to be "
                   "reviewed: a user's report or a reviewer's label on any request can then go back into training "
                   "(vggnet retrain); still bounded by --keep-inputs-mb")
    p.add_argument("--keep-inputs-mb", type=float, metavar="MB",
                   help="the most --keep-inputs may hold, in MiB; then images are no longer kept (default: 1024)")
    _add_guard_flags(p)
    p.add_argument("--no-prediction-log", dest="prediction_log", action="store_false", default=None,
                   help="no JSON line per prediction on stdout (the store's fields, for ELK / Loki)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    """What is served: a repository folder, checkpoints, or a registered model that the server follows."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-repo", metavar="DIR", help="model repository folder (see the layout below)")
    source.add_argument("--ckpt", action="append", metavar="RUN",
                        help="run folder, .safetensors checkpoint or exported file (.onnx, .int8.onnx, .pt2, "
                        ".int8.pt2, .pt), served as exported; repeat to serve several")
    source.add_argument("--registry", nargs="?", const="", metavar="URI",
                        help="serve --model from the MLflow Model Registry at URI (default: $MLFLOW_TRACKING_URI, "
                        "else runs/mlruns/mlflow.db) and follow it: M@champion is the default version, M@challenger "
                        "runs in shadow or answers an A/B share (vggnet registry mode); an alias that moves is "
                        "served within a poll, loaded beside the running version, without a restart")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="served name of the --ckpt at the same position (default: its run folder's name)")
    p.add_argument("--model", metavar="M", help="with --registry: the registered model, served under the name M "
                   "with its registry version numbers as versions")
    p.add_argument("--registry-poll-s", type=float, metavar="S",
                   help="with --registry: seconds between reads of the registry (default: 10); a version that "
                   "fails to load is tried again only when the registry changes")


def _add_guard_flags(p: argparse.ArgumentParser) -> None:
    """The adversarial-input guard's flags (vggnet.serve.guard)."""
    p.add_argument("--adversarial-guard", action="store_true", default=None,
                   help="score every prediction for adversarial inputs (feature squeezing: two extra forward passes "
                   "per image) against adversarial.json beside the checkpoint (vggnet robustness writes it); the "
                   "score is stored (adv_score), flagged images counted (vggnet_adversarial_flagged_total)")
    p.add_argument("--reject-adversarial", action="store_true", default=None,
                   help="answer 422 to a request with a flagged image (still stored and counted); implies "
                   "--adversarial-guard")


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--port", args.port), ("--max-batch-size", args.max_batch_size),
                        ("--max-queue", args.max_queue), ("--threads", args.threads),
                        ("--max-image-pixels", args.max_image_pixels), ("--calib-n", args.calib_n),
                        ("--max-concurrency", args.max_concurrency), ("--decode-threads", args.decode_threads),
                        ("--max-explain-jobs", args.max_explain_jobs)):
        zero_ok = flag in ("--port", "--max-concurrency", "--decode-threads")
        if value is not None and value < (0 if zero_ok else 1):
            raise UsageError(f"{flag} must be {'0 or more' if zero_ok else 'positive'}, got {value}")
    if args.review_sample is not None and not 0 <= args.review_sample <= 1:
        raise UsageError(f"--review-sample must be a share in [0, 1], got {args.review_sample}")
    if args.live_accuracy_every is not None and args.live_accuracy_every < 0:
        raise UsageError(f"--live-accuracy-every must be 0 (off) or more seconds, got {args.live_accuracy_every}")
    if args.live_accuracy_every is not None and not args.store:
        raise UsageError("--live-accuracy-every needs --store URL (live accuracy is read from the store)")
    if args.store_keep_days is not None and args.store_keep_days <= 0:
        raise UsageError(f"--store-keep-days must be positive, got {args.store_keep_days}")
    if args.store_keep_days is not None and not args.store:
        raise UsageError("--store-keep-days needs --store URL")
    if args.keep_all_inputs and not args.keep_inputs:
        raise UsageError("--keep-all-inputs needs --keep-inputs DIR")
    if (args.keep_inputs or args.keep_inputs_mb is not None) and not args.store:
        raise UsageError("--keep-inputs needs --store URL (a kept image is found through its stored prediction)")
    if args.keep_inputs_mb is not None and args.keep_inputs_mb <= 0:
        raise UsageError(f"--keep-inputs-mb must be positive, got {args.keep_inputs_mb}")
    if args.name and not args.ckpt:
        raise UsageError("--name names --ckpt checkpoints; with --model-repo use name: in config.yaml"
                         + ("; with --registry the name is the registered model's (--model)" if args.registry
                            is not None else ""))
    _check_registry_flags(args)


def _check_registry_flags(args: argparse.Namespace) -> None:
    if args.model is not None and args.registry is None:
        raise UsageError("--model names a registered model: it needs --registry [URI] (not --ckpt or --model-repo)")
    if args.registry is not None and not args.model:
        raise UsageError("--registry needs --model M, the registered model to serve")
    if args.registry_poll_s is not None and args.registry is None:
        raise UsageError("--registry-poll-s needs --registry")
    if args.registry_poll_s is not None and not args.registry_poll_s > 0:
        raise UsageError(f"--registry-poll-s must be positive, got {args.registry_poll_s}")


def _settings(args: argparse.Namespace) -> ServeSettings:
    from vggnet.serve.settings import ServeSettings, with_overrides

    settings = with_overrides(
        ServeSettings(), runtime=args.runtime, max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
        batching=args.batching, max_queue=args.max_queue,
        max_body_bytes=None if args.max_body_mb is None else int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels, request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout, warmup=args.warmup, access_log=args.access_log,
        max_concurrency=args.max_concurrency, body_timeout_s=args.body_timeout, decode_threads=args.decode_threads,
        calib_data=args.calib_data, calib_n=args.calib_n, trust_model_code=args.trust_model_code,
        device=args.device, precision=args.precision, max_explain_jobs=args.max_explain_jobs, docs=args.docs,
        store=args.store, store_keep_days=args.store_keep_days, review_sample=args.review_sample,
        live_accuracy_every_s=args.live_accuracy_every,
        keep_inputs=args.keep_inputs, keep_inputs_mb=args.keep_inputs_mb,
        keep_all_inputs=args.keep_all_inputs,
        prediction_log=args.prediction_log, reject_adversarial=args.reject_adversarial,
        adversarial_guard=args.adversarial_guard or args.reject_adversarial)
    from vggnet.serve.hosts import allowed_hosts_for, parse_allowed_hosts

    listed = None if args.allowed_hosts is None else parse_allowed_hosts(args.allowed_hosts)
    if listed == ():
        raise UsageError("--allowed-hosts names no host; give names, or '*' for any")
    hosts = allowed_hosts_for(args.host, listed)  # checks --host as well
    if listed is not None:  # else run_server derives the same list, and warns when it accepts any host
        settings = with_overrides(settings, allowed_hosts=hosts)
    if args.api_key_file:
        from vggnet.serve.auth import PUBLIC_GROUPS, read_api_keys

        public = tuple(g.strip() for g in args.public_endpoints.split(",") if g.strip() and g.strip() != "none")
        unknown = sorted(set(public) - set(PUBLIC_GROUPS))
        if unknown:
            raise UsageError(f"--public-endpoints: unknown group(s) {unknown}; choose from {', '.join(PUBLIC_GROUPS)}")
        settings = with_overrides(settings, api_keys=read_api_keys(args.api_key_file), public_endpoints=public)
    if settings.max_queue < settings.max_batch_size:
        settings = with_overrides(settings, max_queue=settings.max_batch_size)
    return settings


def _check_repo(repo: ModelRepository, settings: ServeSettings) -> None:
    """Usage errors now, not a model that never gets ready: a missing GPU, an unknown runtime, an exported file
    given a runtime, a device or calibration images that would not apply to it, a calibrated runtime with no
    calibration images (neither calib_data nor a run folder: the rule of vggnet.infer.find_calibration)."""
    from vggnet.infer import find_calibration
    from vggnet.infer.predictor import check_cpu_only, placement
    from vggnet.serve.versions import CALIB_HINT, check_exported, ensure_runtime

    if settings.device is not None or settings.precision is not None:
        placement(settings.device, settings.precision)
    for model in repo.models.values():
        runtime = model.runtime or settings.runtime
        ensure_runtime(runtime)
        if runtime != "eager":
            check_cpu_only(f"runtime {runtime} (model {model.name})", settings.device, settings.precision)
        kinds = [check_exported(file, runtime, settings.trust_model_code, settings.device, settings.precision)
                 for file in model.versions.values()]
        if runtime not in _CALIBRATED:
            continue
        for file, kind in zip(model.versions.values(), kinds, strict=True):
            if kind is None:  # a checkpoint: exported INT8 files are calibrated already
                find_calibration(file, model.calib_data or settings.calib_data, hint=CALIB_HINT,
                                 needed_by=f"runtime {runtime} (model {model.name})")


def _setup_logging(level: str) -> None:
    """Access-log and prediction lines (JSON) to stdout, the service's events to stderr."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("vggnet.serve.access", "vggnet.serve.predictions"):
        lines = logging.getLogger(name)
        lines.addHandler(handler)
        lines.setLevel(logging.INFO)
        lines.propagate = False
    events = logging.StreamHandler(sys.stderr)
    events.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    service = logging.getLogger("vggnet.serve")
    service.addHandler(events)
    service.setLevel(level.upper())


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from vggnet.serve import app  # run_server looked up at call time: tests replace it
    from vggnet.serve.repository import ModelRepository

    _check_flags(args)
    settings = _settings(args)
    follower = None
    if args.registry is not None:
        follower = _registry_follower(args)
        repo = follower.first()  # unreachable, no champion, a champion's file missing or changed: one line, exit 2
    else:
        repo = (ModelRepository.from_dir(args.model_repo) if args.model_repo
                else ModelRepository.from_checkpoints(args.ckpt, args.name))
    _check_repo(repo, settings)
    if settings.adversarial_guard:  # no threshold beside a checkpoint: one line naming the command, no server
        from vggnet.serve.guard import reference

        for model in repo.models.values():
            for file in model.versions.values():
                reference(file)
    if settings.store:  # a URL that is wrong or a database that is down: one line now, not a server that drops rows
        from vggnet import store

        store.connect(settings.store).dispose()
    if args.threads:
        torch.set_num_threads(args.threads)
    _setup_logging(args.log_level)
    names = ", ".join(f"{m.name} ({', '.join(m.ordered_versions)})" for m in repo.models.values())
    print(f"vggnet serve: {names} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    if follower is None:
        app.run_server(repo, settings, host=args.host, port=args.port, log_level=args.log_level)
        return 0
    print(f"vggnet serve: following {args.model} in the model registry {follower.where} every "
          f"{follower.poll_s:g} s", file=sys.stderr, flush=True)
    app.run_server(repo, settings, host=args.host, port=args.port, log_level=args.log_level, background=[follower])
    return 0


def _registry_follower(args: argparse.Namespace) -> Any:
    """The serve room's follower over a plain callable reading the registry room (the rooms never meet)."""
    from vggnet.registry import resolve_uri
    from vggnet.registry.serving import display_uri, state_reader
    from vggnet.serve.follow import RegistryFollower, Wanted

    uri = resolve_uri(args.registry or None)
    read = state_reader(uri, args.model)

    def wanted() -> Wanted:
        state = read()
        champion = (state.champion.version, state.champion.checkpoint, state.champion.sha256)
        challenger = None if state.challenger is None else (state.challenger.version, state.challenger.checkpoint,
                                                             state.challenger.sha256)
        return Wanted.of(state.name, champion, challenger, state.challenger_share if state.mode == "ab" else None)

    return RegistryFollower(wanted, poll_s=args.registry_poll_s or DEFAULT_POLL_S, where=display_uri(uri))
