"""``POST /v2/models/{name}/feedback``: a client says what an answer should have been.

``{"id": "<the V2 request id or /predict's id>", "label": "<class name>" | null, "item": 0}``; ``null`` is
"none of these" (not one of the model's classes); ``item`` picks one image of a batched V2 request. The label
is stored as a *user report* (source ``user``): users report what they notice, mostly mistakes, so these
labels are kept apart from the reviewed random sample that live accuracy is measured on.

Labels change what the next model is trained on, so the route is never public when API keys are set, and
without keys a browser on another site is refused (as for model load/unload), so no page can post labels
through its visitors.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..auth import cross_site
from ..deps import Recorder, Server
from ..errors import ServeError, bad_request, not_found
from ..limits import read_body

__all__ = ["router"]

router = APIRouter()

#: a label is a class name and an id: anything larger is not feedback
MAX_FEEDBACK_BYTES = 4096


def _parse(body: bytes) -> tuple[str, int, str | None]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"feedback must be a JSON object: {exc}") from None
    if not isinstance(doc, dict) or "id" not in doc or "label" not in doc:
        raise bad_request('feedback must be a JSON object {"id": request id, "label": class name or null}')
    request_id, label, item = doc["id"], doc["label"], doc.get("item", 0)
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 64:
        raise bad_request("id must be the request id string of a prediction (at most 64 characters)")
    if label is not None and not isinstance(label, str):
        raise bad_request("label must be a class name (a string), or null for none of the model's classes")
    if isinstance(item, bool) or not isinstance(item, int) or item < 0:
        raise bad_request("item must be a non-negative integer (the image's index in a batched request)")
    return request_id, item, label


def _classes(server: Any, name: str) -> set[str]:
    """Every class name any version of ``name`` knows (a label for one version's answer may come later)."""
    model = server.model(name)  # 404 for an unknown model
    names: set[str] = set()
    for mv in model.versions.values():
        if mv.predictor is not None:  # loaded (a version still loading has no class list yet)
            prep = mv.predictor.prep
            names.update(prep.label(i) for i in range(prep.num_classes))
    return names


@router.post("/v2/models/{name}/feedback")
async def feedback(request: Request, name: str, server: Server, recorder: Recorder) -> JSONResponse:
    if not server.settings.api_keys and cross_site(request.headers):
        raise ServeError(403, "feedback from another site is refused; post it from this server's page or a client")
    if not recorder.storing:
        raise ServeError(501, "the prediction store is off: start the server with --store URL to keep feedback")
    body = await read_body(request, MAX_FEEDBACK_BYTES, server.settings.body_timeout_s)
    request_id, item, label = _parse(body)
    classes = _classes(server, name)
    if label is not None and classes and label not in classes:
        shown = ", ".join(sorted(classes)[:20]) + (" ..." if len(classes) > 20 else "")
        raise bad_request(f"label {label!r} is not a class of model {name!r}: {shown}")
    from vggnet import store

    def add() -> None:
        store.add_label(recorder.engine, request_id=request_id, item=item, model=name, label=label, source="user",
                        who="client")

    try:
        try:
            await server.offload(add)
        except store.UnknownPrediction:  # the row may still wait in the writer's queue: one flush later, once
            await asyncio.sleep(2 * recorder.writer_flush_s)
            await server.offload(add)
    except store.UnknownPrediction as exc:
        raise not_found(str(exc)) from None
    except store.StoreError as exc:
        raise ServeError(503, f"the prediction store did not take the label: {exc}") from None
    return JSONResponse({"id": request_id, "item": item, "label": label, "stored": True}, status_code=201)
