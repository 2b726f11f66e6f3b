"""Request dependencies: the app's services, token auth, admission (429s) and a safe image upload.

/v1 takes the API token as a bearer token, then spends one of its rate-limit tokens; a prediction also
takes an in-flight slot *before* its upload is read. Operations routes (/metrics, the API docs) take the
API token or ``serving.metrics_token``, as a bearer token or as the Basic password (a browser asks for
Basic and then sends it with the docs page's own /openapi.json fetch).

The upload is read from the raw body stream with a byte cap *before* multipart parsing, so an oversize
body is refused at the cap instead of being spooled to disk first; the image is then decoded by
``imagefacts.decode_image`` with the pixel cap (decompression bombs are refused from the header).
Every bad input maps to a 4xx with a message that names the reason.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from pipelines.core.settings import Settings, env_name
from pipelines.data.imagefacts import DecodedImage, ImageDecodeError, decode_image
from serving.limits import Admission, retry_after
from serving.metrics import ServingMetrics
from serving.model import BatchPredictor, ModelHolder
from serving.requestlog import RequestLog

UPLOAD_FIELD = "file"
TOKEN_SETTING = "serving.token"  # the secret every /v1 request is checked against
METRICS_TOKEN_SETTING = "serving.metrics_token"  # optional: operations routes only
OPERATOR_REALM = "leukops operations"
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the file
DECODE_STATUS = {
    "empty": 400,
    "not_an_image": 415,
    "corrupt": 422,
    "truncated": 422,
    "too_many_pixels": 413,
}

_bearer = HTTPBearer(auto_error=False, description=env_name(TOKEN_SETTING))
_basic = HTTPBasic(auto_error=False, realm=OPERATOR_REALM, description="any user name, a token as the password")


@dataclass
class Services:
    """Everything a route needs, created once per app in its lifespan."""

    settings: Settings
    holder: ModelHolder
    predictor: BatchPredictor
    request_log: RequestLog | None
    metrics: ServingMetrics
    admission: Admission


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
    if not _matches(credentials.credentials, expected):
        raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
    wait_s = get_services(request).admission.rate.take(TOKEN_SETTING)  # one bucket per accepted token
    if wait_s > 0:
        raise HTTPException(
            429, f"rate limit of {env_name(TOKEN_SETTING)} reached", headers={"Retry-After": retry_after(wait_s)}
        )


async def prediction_slot(services: ServicesDep) -> AsyncIterator[None]:
    """Hold one of ``serving.max_in_flight`` slots for the whole prediction; none free: 429 at once."""
    cap = services.admission.predictions
    if not cap.try_enter():
        raise HTTPException(
            429, f"{cap.limit} predictions are in flight (LEUKOPS_SERVING__MAX_IN_FLIGHT)", headers={"Retry-After": "1"}
        )
    try:
        yield
    finally:
        cap.leave()


def require_operator(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    basic: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> None:
    settings = get_services(request).settings
    accepted = [settings.secret(TOKEN_SETTING)]
    if settings.serving.metrics_token is not None:
        accepted.append(settings.serving.metrics_token.get_secret_value())
    presented = _presented_token(bearer, basic)
    if presented is None or not any(_matches(presented, token) for token in accepted):
        raise HTTPException(
            401,
            f"send {env_name(TOKEN_SETTING)} or {env_name(METRICS_TOKEN_SETTING)} as a bearer token "
            "or as the Basic password",
            headers={"WWW-Authenticate": f'Basic realm="{OPERATOR_REALM}", charset="UTF-8"'},
        )


def _presented_token(bearer: HTTPAuthorizationCredentials | None, basic: HTTPBasicCredentials | None) -> str | None:
    if basic is not None:
        return basic.password
    if bearer is not None and bearer.scheme.lower() == "bearer":
        return bearer.credentials
    return None


def _matches(presented: str, expected: str) -> bool:
    return secrets.compare_digest(presented.encode(), expected.encode())


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
    if (side_error := image.side_error()) is not None:  # the ingest suite's rule: no train/serve skew
        raise HTTPException(422, f"{name}: {side_error}")
    return Upload(image, data, upload.filename)


UploadDep = Annotated[Upload, Depends(image_upload)]
