"""Image uploads for people and simple clients: ``POST /predict`` (top-k labels) and ``POST /explain`` (Grad-CAM,
run on the version's worker like a prediction: see :mod:`vggnet.serve.cam`). An image is a multipart upload with
one file, or the raw body; it is decoded and preprocessed exactly as ``vggnet predict`` reads a file."""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Message

from vggnet.infer import Preprocessing, preprocess

from .. import cam, guard, ood
from ..deps import Metrics, Recorder, Server, Settings
from ..errors import ServeError, bad_request
from ..lifecycle import ModelServer
from ..limits import IMAGE_MEDIA_TYPES, decode_image, media_type, read_body
from ..metrics import ServeMetrics
from ..middleware import note
from ..settings import ServeSettings
from ..shadow import start_shadows
from ..versions import ModelVersion

__all__ = ["router"]

router = APIRouter()


def _image_media(request: Request) -> str:
    """The media type of an image upload: multipart or an image type, else 415."""
    media = media_type(request)
    if media != "multipart/form-data" and media not in IMAGE_MEDIA_TYPES:
        raise ServeError(415, f"content type {media or 'missing'!r} not accepted; send multipart/form-data "
                              "with one image file, or the image itself as image/jpeg, image/png, image/webp, "
                              "image/bmp, image/gif or application/octet-stream")
    return media


def _topk(request: Request, default: int, classes: int) -> int:
    text = request.query_params.get("topk")
    if text is None:
        return min(default, classes)
    try:
        k = int(text)
    except ValueError:
        raise bad_request(f"topk must be an integer, got {text!r}") from None
    if k < 1:
        raise bad_request(f"topk must be at least 1, got {k}")
    return min(k, classes)


def _image_batch(data: bytes, prep: Preprocessing, max_pixels: int) -> torch.Tensor:
    """Decode (pixel limit checked first) and preprocess exactly as ``Predictor.predict`` does."""
    image = decode_image(data, max_pixels)
    try:
        return preprocess([image], prep)
    finally:
        image.close()


async def _upload_bytes(request: Request, body: bytes) -> bytes:
    """The one file of a multipart upload (any field name), parsed from the already size-capped body."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form(max_files=1, max_fields=16)
    except StarletteHTTPException as exc:  # Starlette's own answer to a malformed multipart body
        raise bad_request(f"malformed multipart body: {exc.detail}") from None
    except (MultiPartException, ValueError) as exc:  # python-multipart's parse errors (FormParserError)
        raise bad_request(f"malformed multipart body: {exc}") from None
    try:
        files = [value for _, value in form.multi_items() if not isinstance(value, str)]
        if len(files) != 1:
            raise bad_request(f"expected one image file in the multipart body, got {len(files)}")
        return await files[0].read()
    finally:
        await form.close()


async def _image(request: Request, media: str, server: ModelServer, settings: ServeSettings,
                 prep: Preprocessing) -> tuple[torch.Tensor, bytes]:
    """The uploaded image as a 1×C×S×S batch, and its bytes; call inside ``server.admitted()``."""
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    data = await _upload_bytes(request, body) if media == "multipart/form-data" else body
    if not data:
        raise bad_request("empty body; send an image")
    return await server.offload(_image_batch, data, prep, settings.max_image_pixels), data


def _explain_spec(request: Request, mv: ModelVersion) -> cam.ExplainSpec | ServeError | None:
    """``/predict?explain=1[&layer=]``: the Grad-CAM asked for with the prediction (None when not asked), or the
    error that stops it (an exported file: 501), which the stream reports in place of the map. A bad layer is
    still a 400 before the body is read."""
    if request.query_params.get("explain") not in ("1", "true"):
        return None
    params = {"layer": request.query_params.get("layer") or "", "format": "png"}
    try:
        return cam.parse_spec(mv.explain_model, mv.prep, params, None,
                              f"model {mv.name!r} version {mv.version} ({mv.runtime_label})")
    except ServeError as exc:
        if exc.status == 501:
            return exc
        raise


async def _explained(request: Request, server: ModelServer, mv: ModelVersion, metrics: ServeMetrics,
                     x: torch.Tensor, spec: cam.ExplainSpec) -> dict[str, Any]:
    """The Grad-CAM of ``x`` as a JSON object with the overlay as a ``data:`` URL (the page shows it as it is)."""
    future = server.submit_job(mv, functools.partial(cam.run_cam, mv.explain_model, x, spec))
    out, info = await server.result(mv, future)
    metrics.explain_latency.labels(mv.name, mv.version).observe(info.compute_s)
    note(request, explained=out.target, layer=out.layer)
    png, _, _ = await server.offload(cam.render, out, x, mv.prep, spec, mv.name, mv.version)
    return {"class": {"index": out.target, "label": mv.prep.label(out.target),
                      "probability": float(out.probabilities[out.target])},
            "layer": out.layer, "layer_shape": list(out.maps.shape[-2:]), "where": cam.where(out.maps),
            "overlay": "data:image/png;base64," + base64.b64encode(png).decode("ascii")}


def _stream(first: dict[str, Any], explained: Any) -> StreamingResponse:
    """Newline-delimited JSON: the prediction at once, then ``{"explain": ...}`` or ``{"explain_error":
    {"status", "error"}}`` when the map is done — one upload, the bars shown while the map is computed."""
    async def lines() -> AsyncIterator[bytes]:
        yield json.dumps(first).encode() + b"\n"
        try:
            if isinstance(explained, ServeError):
                raise explained
            tail: dict[str, Any] = {"explain": await explained()}
        except ServeError as exc:
            tail = {"explain_error": {"status": exc.status, "error": exc.message}}
        yield json.dumps(tail).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"x-model-version": first["model_version"], "cache-control": "no-store"})


@router.post("/predict")
async def predict(request: Request, server: Server, settings: Settings, metrics: Metrics,
                  recorder: Recorder) -> Response:
    """An image (multipart upload or the raw body) → top-k labels; ?model=&version=&topk=. With ``explain=1``
    (and optionally ``layer=``) the answer is NDJSON: the same object first, then the Grad-CAM of the top class
    from the same upload (the web page's one request per image; see :func:`_stream`)."""
    media = _image_media(request)
    mv = server.version(server.default_model(request.query_params.get("model")),
                        request.query_params.get("version"))
    note(request, model=mv.name, version=mv.version)
    prep = mv.prep
    k = _topk(request, settings.topk, prep.num_classes)
    spec = _explain_spec(request, mv)
    with server.admitted(), server.arriving(mv):
        x, data = await _image(request, media, server, settings, prep)
        future = server.submit(mv, x)
    logits, info = await server.result(mv, future)
    note(request, rows=1, batch=info.batch_rows, queue_ms=round(info.queue_s * 1000, 2),
         compute_ms=round(info.compute_s * 1000, 2))
    all_probs = logits.float().softmax(1)
    request_id = request.scope.get("vggnet.request_id", "")
    screening = await guard.screen(server, mv, x, logits)  # None unless --adversarial-guard
    sampled = recorder.record(request_id, "/predict", mv, all_probs, x, (info.queue_s + info.compute_s) * 1000, data,
                              adversarial=screening)
    start_shadows(server, recorder, mv, x, request_id, "/predict", sampled, data)
    guard.enforce(settings, screening)  # 422 with --reject-adversarial, once stored and counted
    probs = all_probs[0]
    values, indices = probs.topk(k)
    predictions = [{"label": prep.label(int(i)), "index": int(i), "probability": float(v)}
                   for v, i in zip(values, indices, strict=True)]
    # id: what POST /v2/models/{name}/feedback names this prediction by
    answer: dict[str, Any] = {"model_name": mv.name, "model_version": mv.version, "id": request_id,
                              "predictions": predictions}
    if spec is not None:  # the page: also what it warns about (out of domain; see vggnet.serve.ood)
        answer["ood"] = ood.verdict(float(probs.max()), mv.ood)
        explained = spec if isinstance(spec, ServeError) else functools.partial(
            _explained, request, server, mv, metrics, x, cam.ExplainSpec(int(indices[0]), spec.layer, "png"))
        return _stream(answer, explained)
    return JSONResponse(answer, headers={"x-model-version": mv.version})


@router.post("/explain")
async def explain(request: Request, server: Server, settings: Settings, metrics: Metrics) -> Response:
    """An image (as for /predict) → Grad-CAM of one class at one layer over the crop the network saw:
    a PNG overlay, or JSON with the map (``format=json`` or ``Accept: application/json``);
    ?model=&version=&class=&layer=&format=. Runs on the version's worker, between batches (a bounded
    number at a time: ``max_explain_jobs``); an exported file cannot be explained (501)."""
    media = _image_media(request)
    mv = server.version(server.default_model(request.query_params.get("model")),
                        request.query_params.get("version"))
    note(request, model=mv.name, version=mv.version)
    prep = mv.prep
    model = mv.explain_model
    # 501 for an exported file, 400 for a bad class / layer / format: all before a byte of the body is read
    spec = cam.parse_spec(model, prep, request.query_params, request.headers.get("accept"),
                          f"model {mv.name!r} version {mv.version} ({mv.runtime_label})")
    server.check_accepting(mv)
    with server.admitted():
        x, _ = await _image(request, media, server, settings, prep)
        future = server.submit_job(mv, functools.partial(cam.run_cam, model, x, spec))
    out, info = await server.result(mv, future)
    metrics.explain_latency.labels(mv.name, mv.version).observe(info.compute_s)
    note(request, rows=1, batch=1, queue_ms=round(info.queue_s * 1000, 2),
         compute_ms=round(info.compute_s * 1000, 2), explained=out.target, layer=out.layer)
    payload, media_out, headers = await server.offload(cam.render, out, x, prep, spec, mv.name, mv.version)
    return Response(payload, media_type=media_out, headers=headers)
