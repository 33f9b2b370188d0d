"""The Open Inference Protocol (V2) that Triton and KServe clients speak: server and model metadata, health,
readiness, Triton's model configuration, its model repository extension (index, load, unload), and inference
(JSON or binary tensors; FP32 tensors or UINT8 images).

Where this differs from the protocol's text, on purpose: a not-ready server or model answers its readiness probe
503 (the protocol says "a 4xx status"), and inference on a model that is loading, unloaded or draining is 503 with
``Retry-After`` (the protocol says "usually 400"): the condition is the server's, temporary, and 503 is what load
balancers and retrying clients act on (Kubernetes fails a probe on either; ``tritonclient`` reads any non-200 as not
ready and raises the ``{"error": ...}`` body, which is the protocol's)."""

from __future__ import annotations

import json
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

import vggnet
from vggnet.infer import Preprocessing

from .. import guard, v2
from ..auth import cross_site
from ..deps import Server
from ..errors import ServeError, bad_request
from ..lifecycle import ModelServer
from ..limits import decompress, media_type, read_body
from ..middleware import note
from ..shadow import start_shadows

__all__ = ["router"]

router = APIRouter()


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return {"name": "vggnet", "version": vggnet.__version__,
            "extensions": ["binary_tensor_data", "classification", "model_repository"]}


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(server: Server) -> JSONResponse:
    ok = server.ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


async def _options(request: Request, what: str, example: str = '{"parameters": {}}') -> dict[str, Any]:
    """A repository request's optional JSON object body ({} when empty)."""
    body = await read_body(request, 64 * 1024)
    if not body.strip():
        return {}
    try:
        options = json.loads(body)
    except ValueError as exc:
        raise bad_request(f"{what} body is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise bad_request(f"{what} body must be a JSON object, e.g. {example}")
    return options


def _index(server: ModelServer, name: str | None = None, only_ready: bool = False) -> list[dict[str, str]]:
    return [{"name": mv.name, "version": mv.version, "state": mv.state, "reason": mv.reason}
            for mv in server.index_versions() if (mv.ready or not only_ready) and name in (None, mv.name)]


@router.post("/v2/repository/index")
async def repository_index(request: Request, server: Server) -> list[dict[str, str]]:
    options = await _options(request, "repository index", '{"ready": true}')
    return _index(server, only_ready=bool(options.get("ready", False)))


async def _control_options(request: Request, what: str) -> dict[str, Any]:
    """The body of a load / unload, from a client allowed to change the server's state: with API keys the
    AuthMiddleware has checked its key already (these paths are never public); a browser request from another
    site is refused either way (403), since without keys nothing else would stop a web page from sending it."""
    if cross_site(request.headers):
        raise ServeError(403, f"{what} refused: a browser sent it from another site")
    options = await _options(request, what)
    params = options.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request(f"{what} parameters must be a JSON object")
    return params


@router.post("/v2/repository/models/{name}/load")
async def load_model(request: Request, name: str, server: Server) -> list[dict[str, str]]:
    """Triton's load: read the model's folder and files again and serve them once every version is READY (the
    running versions answer meanwhile); a model folder not served yet is served from now on. Answers the model's
    versions with their state, like the index."""
    params = await _control_options(request, "model load")
    if "config" in params or any(str(key).startswith("file:") for key in params):
        raise bad_request("model load takes no config or file overrides: models are read from the server's "
                          "repository only")
    await run_in_threadpool(server.load_model, name)
    return _index(server, name)


@router.post("/v2/repository/models/{name}/unload")
async def unload_model(request: Request, name: str, server: Server) -> list[dict[str, str]]:
    """Triton's unload: the model's requests get 503 from now on, its queued ones are answered, its weights are
    freed; it no longer counts towards /v2/health/ready. ``unload_dependents`` is accepted (there are none)."""
    await _control_options(request, "model unload")
    await run_in_threadpool(server.unload_model, name)
    return _index(server, name)


def _metadata(server: ModelServer, name: str, version: str | None) -> dict[str, Any]:
    model = server.model(name)
    mv = server.version(name, version) if version else model.versions[model.config.default_version]
    versions = [mv.version] if version else list(model.versions)
    params: dict[str, Any] = {"runtime": mv.runtime_label, "max_batch_size": mv.max_batch_size}
    if not version:
        params.update(default_version=model.config.default_version, ab=model.config.ab)
    params["format"] = mv.format or "checkpoint"
    return v2.model_metadata(name, versions, mv.prep, platform=mv.platform, parameters=params)


@router.get("/v2/models/{name}")
async def model_metadata(name: str, server: Server) -> dict[str, Any]:
    return _metadata(server, name, None)


@router.get("/v2/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, server: Server) -> dict[str, Any]:
    return _metadata(server, name, version)


def _ready(server: ModelServer, name: str, version: str | None) -> JSONResponse:
    model = server.model(name)
    ok = server.version(name, version).ready if version else model.ready
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok and not server.closing else 503)


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, server: Server) -> JSONResponse:
    return _ready(server, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, server: Server) -> JSONResponse:
    return _ready(server, name, version)


def _config(server: ModelServer, name: str, version: str | None) -> dict[str, Any]:
    model = server.model(name)
    mv = server.version(name, version) if version else model.versions[model.config.default_version]
    return v2.model_config(name, mv.prep, max_batch_size=mv.max_batch_size, max_delay_ms=mv.max_delay_ms,
                           batching=mv.batching, platform=mv.platform)


@router.get("/v2/models/{name}/config")
async def model_config(name: str, server: Server) -> dict[str, Any]:
    return _config(server, name, None)


@router.get("/v2/models/{name}/versions/{version}/config")
async def model_version_config(name: str, version: str, server: Server) -> dict[str, Any]:
    return _config(server, name, version)


def _parse_infer(body: bytes, encoding: str | None, header_length: str | None, prep: Preprocessing,
                 max_batch: int, limit: int, max_pixels: int) -> tuple[v2.InferRequest, torch.Tensor,
                                                                       list[v2.OutputSpec]]:
    """A V2 infer body -> (parsed request, input tensor, requested outputs), checked; run in a worker thread."""
    parsed = v2.parse_request(decompress(body, encoding, limit), header_length)
    return parsed, v2.input_tensor(parsed, prep, max_batch, max_pixels), v2.requested_outputs(parsed, prep)


async def _infer(request: Request, server: ModelServer, name: str, version: str | None) -> Response:
    settings = server.settings
    header_length = request.headers.get(v2.HEADER_LENGTH)
    v2.check_json_media(media_type(request), header_length)
    mv = server.version(name, version)  # 404 / A/B choice before a byte of the body is read
    note(request, model=mv.name, version=mv.version)
    with server.admitted(), server.arriving(mv):
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        prep = mv.prep
        # inflating, JSON parsing and tensor building are CPU work: off the event loop, so a 32 MiB body
        # does not stall other connections (health probes included)
        parsed, x, outputs = await server.offload(
            _parse_infer, body, request.headers.get("content-encoding"), header_length, prep, mv.max_batch_size,
            settings.max_body_bytes, settings.max_image_pixels)
        future = server.submit(mv, x)
    logits, info = await server.result(mv, future)
    note(request, rows=int(x.shape[0]), batch=info.batch_rows, queue_ms=round(info.queue_s * 1000, 2),
         compute_ms=round(info.compute_s * 1000, 2))
    # the V2 request's own id when it sent one (the feedback names it), else the server's request id
    request_id = parsed.id or request.scope.get("vggnet.request_id", "")
    recorder = request.app.state.recorder
    screening = await guard.screen(server, mv, x, logits)  # None unless --adversarial-guard
    sampled = recorder.record(request_id, "/v2/infer", mv, logits.float().softmax(1), x,
                              (info.queue_s + info.compute_s) * 1000, adversarial=screening)
    start_shadows(server, recorder, mv, x, request_id, "/v2/infer", sampled)
    guard.enforce(settings, screening)  # 422 with --reject-adversarial, once stored and counted
    payload, headers = v2.encode_response(
        logits, outputs, prep, model_name=mv.name, model_version=mv.version, request_id=parsed.id,
        parameters={"batch_size": info.batch_rows, "queue_ms": round(info.queue_s * 1000, 3),
                    "compute_ms": round(info.compute_s * 1000, 3)})
    media = headers.pop("content-type")
    headers["x-model-version"] = mv.version
    return Response(payload, media_type=media, headers=headers)


@router.post("/v2/models/{name}/infer")
async def infer(request: Request, name: str, server: Server) -> Response:
    return await _infer(request, server, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer_version(request: Request, name: str, version: str, server: Server) -> Response:
    return await _infer(request, server, name, version)
