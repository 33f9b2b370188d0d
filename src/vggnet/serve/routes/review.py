"""Human review (issue #30): ``GET /review`` (the page), ``GET /v2/review/queue`` and ``POST /v2/review/label``.

The queue is :func:`vggnet.store.review_queue`: the uniform random sample first (the only unbiased basis of
accuracy), then low-confidence predictions, user reports and disagreements between versions. A label is stored
with source ``review``, and ``who`` says which key gave it: ``key-<first 8 hex digits of the key's SHA-256>``
(enough to tell a handful of keys apart, nothing to recover a key from), or ``<name> (key-...)`` when the label
carries a ``reviewer`` name (the page's optional name field; a JSON field rather than a header, so any name in any
script travels). The name is what the reviewer says, the key part is what the server checked.
``{"skip": true}`` stores nothing: a skipped image stays in the queue for the next reviewer (a stored skip would
read as "none of these", and dropping skipped images from the random sample would bias it); the page hides it for
the rest of its session.

Review labels change what a later model is trained on and what its accuracy is said to be, so the ``/v2/review/``
routes are ALWAYS behind an API key: without ``--api-key-file`` they answer 403 (no "open port" mode), and they
check the bearer key themselves as well as :class:`vggnet.serve.auth.AuthMiddleware` (never in a public group).
``GET /review`` is the page's static HTML, public like ``GET /`` (a browser cannot attach a token to a page load;
the bytes are the same on every server); every call it makes carries the key the reviewer types in.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from vggnet.errors import UsageError

from .. import web
from ..deps import Recorder, Server
from ..errors import ServeError, bad_request, not_found
from ..limits import read_body

__all__ = ["NO_KEYS", "router"]

router = APIRouter()

NO_KEYS = ("review needs API keys: start the server with --api-key-file (review labels change what a later model "
           "is trained on, so they are never open)")
#: an id, a model, a class name and a flag: anything larger is not a review label
MAX_LABEL_BYTES = 4096
MAX_QUEUE = 200
MAX_NAME = 64


@router.get("/review", include_in_schema=False)
async def review_page() -> Response:
    return web.page_response("review.html")


async def reviewer(request: Request, server: Server) -> str:
    """The reviewer's key as ``key-<8 hex digits of its SHA-256>``, checked here whatever the middleware did. A
    dependency, so a server without keys answers 403 (and a wrong key 401) before anything else is looked at."""
    keys = server.settings.api_keys
    if not keys:
        raise ServeError(403, NO_KEYS)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token_bytes = token.strip().encode()
    matched = [key for key in keys if hmac.compare_digest(token_bytes, key.encode())]  # every key compared
    if scheme.lower() != "bearer" or not token_bytes or not matched:
        raise ServeError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                         {"WWW-Authenticate": 'Bearer realm="vggnet"'})
    return "key-" + hashlib.sha256(matched[0].encode()).hexdigest()[:8]


Reviewer = Annotated[str, Depends(reviewer)]


def _store(recorder: Any) -> Any:
    if not recorder.storing:
        raise ServeError(501, "the prediction store is off: start the server with --store URL to review predictions")
    from vggnet import store

    return store


def _down(store: Any) -> tuple[type[Exception], ...]:
    """The errors of a database that is unreachable or failing: 503, never a 500 with a traceback."""
    from sqlalchemy.exc import OperationalError

    return store.StoreError, OperationalError


def _classes(server: Any, name: str) -> list[str]:
    """The class names of model ``name`` in its loaded versions' order (a label for any version's answer); empty
    when the server does not serve it (any class name is then taken: there is nothing to check it against)."""
    model = server.models.get(name)
    names: list[str] = []
    for mv in model.versions.values() if model is not None else ():
        if mv.predictor is not None:  # loaded (a version still loading has no class list yet)
            prep = mv.predictor.prep
            names += [c for c in (prep.label(i) for i in range(prep.num_classes)) if c not in names]
    return names


def _entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A queue entry as JSON: ``id`` is the request id, as in feedback and labels."""
    shown = ("version", "role", "route", "predicted", "confidence", "topk", "latency_ms", "ood_score", "input_path")
    return {"model": entry["model"], "id": entry["request_id"], "item": entry["item"],
            "created_at": entry["created_at"].isoformat(), "reasons": entry["reasons"],
            "predictions": [{**{k: p[k] for k in shown}, "created_at": p["created_at"].isoformat()}
                            for p in entry["predictions"]]}


@router.get("/v2/review/input/{prefix}/{name}")
async def review_input(prefix: str, name: str, key: Reviewer, recorder: Recorder) -> Response:
    """A kept input (``--keep-inputs``): the crop the network saw, as a PNG, for the reviewer only; its path is a
    queue entry's ``input_path``. Anything that is not a kept file's name is 404 (no path is resolved from it)."""
    keeper = recorder.keeper
    file = keeper.path(f"{prefix}/{name}") if keeper is not None else None
    if file is None:
        raise ServeError(404, "no kept input of that name" if keeper is not None else
                         "this server keeps no inputs: start it with --keep-inputs DIR")
    return Response(file.read_bytes(), media_type="image/png", headers={"cache-control": "private, no-store"})


@router.get("/v2/review/queue")
async def review_queue(key: Reviewer, server: Server, recorder: Recorder, model: str | None = None,
                       limit: int = Query(20, ge=1, le=MAX_QUEUE)) -> JSONResponse:
    """What needs a person next (``items``, in queue order), how many in all (``queued``), each model's classes."""
    store = _store(recorder)

    # the threshold below which record.py keeps inputs for review (--keep-inputs), when this server has it
    low = float(getattr(server.settings, "review_low_confidence", 0.5))

    def read() -> tuple[list[dict[str, Any]], int]:
        return (store.review_queue(recorder.engine, model=model or None, limit=limit, low_confidence=low),
                store.review_queue_size(recorder.engine, model=model or None, low_confidence=low))

    try:
        items, queued = await server.offload(read)
    except _down(store) as exc:
        raise ServeError(503, f"the prediction store did not answer: {type(exc).__name__}") from None
    classes = {}
    for entry in items:
        if entry["model"] not in classes:
            known = _classes(server, entry["model"])
            seen = [c for p in entry["predictions"] for c, _ in p["topk"]]
            classes[entry["model"]] = known or list(dict.fromkeys(seen))
    return JSONResponse({"items": [_entry(e) for e in items], "queued": queued, "classes": classes,
                         "reasons": list(store.REVIEW_REASONS)})


def _parse(body: bytes) -> tuple[str, int, str, str | None, bool, str]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"a review label must be a JSON object: {exc}") from None
    if not isinstance(doc, dict) or not {"id", "model"} <= doc.keys() or ("label" not in doc and not doc.get("skip")):
        raise bad_request('a review label is {"id", "item", "model", "label": class name or null, "skip": false, '
                          '"reviewer": optional name}')
    request_id, item, model, label, skip = doc["id"], doc.get("item", 0), doc["model"], doc.get("label"), doc.get(
        "skip", False)
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 64:
        raise bad_request("id must be the request id string of a prediction (at most 64 characters)")
    if isinstance(item, bool) or not isinstance(item, int) or item < 0:
        raise bad_request("item must be a non-negative integer (the image's index in a batched request)")
    if not isinstance(model, str) or not model:
        raise bad_request("model must be the name of the model whose prediction is reviewed")
    if label is not None and not isinstance(label, str):
        raise bad_request("label must be a class name (a string), or null for none of the model's classes")
    if not isinstance(skip, bool):
        raise bad_request("skip must be true or false")
    name = doc.get("reviewer") or ""
    if not isinstance(name, str) or len(name.strip()) > MAX_NAME or not name.strip().isprintable():
        raise bad_request(f"reviewer must be a printable name of at most {MAX_NAME} characters")
    return request_id, item, model, label, skip, name.strip()


@router.post("/v2/review/label")
async def review_label(request: Request, key: Reviewer, server: Server, recorder: Recorder) -> JSONResponse:
    """Store one review label (source ``review``, ``who`` the reviewer), or take a skip (stored nowhere)."""
    store = _store(recorder)
    body = await read_body(request, MAX_LABEL_BYTES, server.settings.body_timeout_s)
    request_id, item, model, label, skip, name = _parse(body)
    who = f"{name} ({key})" if name else key
    answer = {"id": request_id, "item": item, "model": model}
    if skip:
        return JSONResponse({**answer, "skipped": True, "stored": False})
    classes = _classes(server, model)
    if label is not None and classes and label not in classes:
        shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
        raise bad_request(f"label {label!r} is not a class of model {model!r}: {shown}")

    def add() -> None:
        store.add_label(recorder.engine, request_id=request_id, item=item, model=model, label=label, source="review",
                        who=who)

    try:
        await server.offload(add)
    except store.UnknownPrediction as exc:
        raise not_found(str(exc)) from None
    except UsageError as exc:  # a model name longer than the store keeps
        raise bad_request(str(exc)) from None
    except _down(store) as exc:
        raise ServeError(503, f"the prediction store did not take the label: {type(exc).__name__}") from None
    return JSONResponse({**answer, "label": label, "who": who, "stored": True}, status_code=201)
