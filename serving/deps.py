"""Request dependencies: the app's services, bearer-token auth and a safe image upload.

The upload is read from the raw body stream with a byte cap *before* multipart parsing, so an oversize
body is refused at the cap instead of being spooled to disk first; the image is then decoded by
``imagefacts.decode_image`` with the pixel cap (decompression bombs are refused from the header).
Every bad input maps to a 4xx with a message that names the reason.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from pipelines.core.settings import Settings, env_name
from pipelines.data.imagefacts import DecodedImage, ImageDecodeError, decode_image
from serving.metrics import ServingMetrics
from serving.model import BatchPredictor, ModelHolder
from serving.requestlog import RequestLog

UPLOAD_FIELD = "file"
TOKEN_SETTING = "serving.token"  # the secret every /v1 request is checked against
MIN_IMAGE_SIDE = 16  # smaller cannot hold a cell, and preprocessing / segmentation refuse it
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the file
DECODE_STATUS = {
    "empty": 400,
    "not_an_image": 415,
    "corrupt": 422,
    "truncated": 422,
    "too_many_pixels": 413,
}

_bearer = HTTPBearer(auto_error=False, description=env_name(TOKEN_SETTING))


@dataclass
class Services:
    """Everything a route needs, created once per app in its lifespan."""

    settings: Settings
    holder: ModelHolder
    predictor: BatchPredictor
    request_log: RequestLog | None
    metrics: ServingMetrics


@dataclass(frozen=True)
class Upload:
    image: DecodedImage
    data: bytes
    filename: str | None


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    expected = get_services(request).settings.secret(TOKEN_SETTING)
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401,
            f"missing bearer token (Authorization: Bearer <{env_name(TOKEN_SETTING)}>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


async def read_capped_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"request body of {int(declared)} bytes exceeds the {max_bytes}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HTTPException(413, f"request body exceeds the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _replayed_form(request: Request, body: bytes):
    """Parse the multipart form of an already-read body (a fresh Request over the same scope)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, receive).form(max_files=1, max_fields=8)


async def image_upload(request: Request, services: ServicesDep) -> Upload:
    """The uploaded image (multipart field ``file``), size- and pixel-capped and decoded to RGB."""
    max_bytes = int(services.settings.serving.max_upload_mb * 1024 * 1024)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, f"send the image as multipart/form-data in a field named {UPLOAD_FIELD!r}")
    body = await read_capped_body(request, max_bytes + MULTIPART_OVERHEAD_BYTES)
    try:
        form = await _replayed_form(request, body)
    except Exception as err:  # noqa: BLE001 - malformed multipart framing is the client's error
        raise HTTPException(400, f"malformed multipart body: {err}") from err
    upload = form.get(UPLOAD_FIELD)
    if not isinstance(upload, UploadFile):
        raise HTTPException(422, f"no file in the multipart field {UPLOAD_FIELD!r}")
    data = await upload.read()
    name = upload.filename or "upload"
    if len(data) > max_bytes:
        raise HTTPException(413, f"{name}: {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:  # decoding a large image takes long: keep it off the event loop (health probes stay live)
        image = await run_in_threadpool(decode_image, data, services.settings.serving.max_pixels)
    except ImageDecodeError as err:
        raise HTTPException(DECODE_STATUS.get(err.reason, 422), f"{name}: {err}") from err
    height, width = image.rgb.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise HTTPException(422, f"{name}: {width}x{height} px is too small (min {MIN_IMAGE_SIDE} px a side)")
    return Upload(image, data, upload.filename)


UploadDep = Annotated[Upload, Depends(image_upload)]
