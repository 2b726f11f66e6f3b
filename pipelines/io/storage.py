"""S3 object-storage adapter: the only module that imports ``minio``.

Works against any S3 endpoint (SeaweedFS in the embedded stack, MinIO in compose, AWS). Every call
retries transient failures with exponential backoff; credential and bucket errors are raised at once
with a message that names the endpoint, the bucket and what to fix.

S3 makes a PUT visible only when it completes (single-part and multipart alike), so a reader never sees
a partial object; ``put_*`` therefore write straight to their final key. Originals and manifests
(``layout.IMMUTABLE_PREFIXES``) are never deleted through the adapter.

Conditional writes (``put_new``: ``If-None-Match: *``; ``put_if_match``: ``If-Match: <etag>``) go through
boto3: minio-py would send the headers as user metadata and the write would silently become unconditional.
SeaweedFS 4.48 enforces If-None-Match atomically but lets two racing If-Match writers both win, so the
commit points of ``data/ledger_store`` and ``io/lease`` rely on ``put_new`` alone (DESIGN.md, "Concurrency").
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import ENABLED
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.versioningconfig import VersioningConfig

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import env_name
from pipelines.io import layout

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import S3Role, Settings

T = TypeVar("T")
_BOTO_LOCK = threading.Lock()

AUTH_ERROR_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken"}
TRANSIENT_ERROR_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "ServerBusy"}
NOT_FOUND_CODES = {"NoSuchKey", "NoSuchObject", "NotFound"}

CONTENT_TYPES = {
    ".json": "application/json",
    ".parquet": "application/vnd.apache.parquet",
    ".html": "text/html; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


class StorageError(LeukopsError):
    """An S3 operation failed; the message says which endpoint, bucket and key."""


class StorageAuthError(StorageError):
    pass


class StorageAccessDenied(StorageAuthError):
    """The keys are valid but their identity may not do this (a least-privilege role outside its prefixes)."""


class BucketMissingError(StorageError):
    pass


class ObjectMissingError(StorageError, KeyError):
    pass


class PreconditionFailedError(StorageError):
    """A conditional write lost: the key already exists (``put_new``) or changed since it was read
    (``put_if_match``). Callers re-read and retry, or give up with their own message."""


PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}  # 412; AWS: 409 while racing


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_type_for(key: str) -> str:
    dot = key.rfind(".")
    return CONTENT_TYPES.get(key[dot:].lower(), "application/octet-stream") if dot >= 0 else "application/octet-stream"


def role_key_settings(role: S3Role | None) -> tuple[str, str]:
    """The settings paths of an S3 identity's (access key, secret key); None: the admin pair."""
    if role is None:
        return "s3_access_key", "s3_secret_key"
    return f"s3_roles.{role}.access_key", f"s3_roles.{role}.secret_key"


class ObjectStore:
    """One bucket on one S3 endpoint, signed by one S3 identity."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        region: str = "us-east-1",
        secure: bool = False,
        retries: int = 4,
        backoff_s: float = 0.25,
        identity: str = "admin",
        key_settings: tuple[str, str] = ("s3_access_key", "s3_secret_key"),
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.identity = identity  # which S3 identity signs the calls: named when the store refuses one
        self.key_settings = key_settings
        self.retries = retries
        self.backoff_s = backoff_s
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60),
            maxsize=32,
            retries=urllib3.Retry(total=0),  # our own loop retries, with error classification
        )
        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http
        )
        # minio-py sends If-None-Match / If-Match as X-Amz-Meta-* user metadata (the write turns
        # unconditional), so conditional writes go through boto3, built on first use
        self._boto_args = {
            "endpoint_url": f"{'https' if secure else 'http'}://{endpoint}",
            "aws_access_key_id": access_key,
            "aws_secret_access_key": secret_key,
            "region_name": region,
        }
        self._boto = None

    @classmethod
    def from_settings(cls, settings: Settings, bucket: str | None = None) -> ObjectStore:
        """A store signed by ``settings.s3_role``'s key pair (``s3_roles.<role>``), else the admin pair."""
        role = settings.s3_role
        keys = role_key_settings(role)
        return cls(
            settings.s3_host,
            settings.secret(keys[0]),
            settings.secret(keys[1]),
            bucket or settings.data_bucket,
            region=settings.s3_region,
            secure=settings.s3_secure,
            identity=role or "admin",
            key_settings=keys,
        )

    @classmethod
    def for_role(cls, settings: Settings, role: S3Role, bucket: str | None = None) -> ObjectStore:
        """A store of one least-privilege identity (what it may write: ``layout.ROLE_WRITES[role]``)."""
        return cls.from_settings(settings.model_copy(update={"s3_role": role}), bucket)

    # -- error handling ---------------------------------------------------------------------------

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{key or ''} at {self.endpoint}"

    def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except S3Error as err:
                if err.code == "AccessDenied":
                    raise StorageAccessDenied(
                        f"{what} {self._where(key)} refused (AccessDenied): the {self.identity!r} S3 identity may "
                        f"not do that ({env_name(self.key_settings[0])})"
                    ) from err
                if err.code in AUTH_ERROR_CODES:
                    raise StorageAuthError(
                        f"{what} {self._where(key)} refused ({err.code}): check {env_name(self.key_settings[0])} / "
                        f"{env_name(self.key_settings[1])}"
                    ) from err
                if err.code == "NoSuchBucket":
                    raise BucketMissingError(
                        f"{what} {self._where(key)}: bucket {self.bucket!r} does not exist "
                        "(run `leukops stack up` or create it on your S3 service)"
                    ) from err
                if err.code in NOT_FOUND_CODES:
                    raise ObjectMissingError(f"{what} {self._where(key)}: no such object") from err
                if err.code not in TRANSIENT_ERROR_CODES or attempt == self.retries:
                    raise StorageError(f"{what} {self._where(key)} failed: {err.code}: {err.message}") from err
            except (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, OSError) as err:
                # 5xx without an S3 error body (a proxy's 502/503, a HEAD that failed): transient
                if attempt == self.retries:
                    raise StorageError(f"{what} {self._where(key)} failed after {attempt + 1} tries: {err}") from err
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    # -- buckets ------------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        if not self._call("bucket_exists", None, lambda: self.client.bucket_exists(self.bucket)):
            self._call("make_bucket", None, lambda: self.client.make_bucket(self.bucket))

    def enable_versioning(self) -> None:
        """Keep every overwritten or deleted object as a prior version (recoverable by its version id)."""
        config = VersioningConfig(ENABLED)
        self._call("set_versioning", None, lambda: self.client.set_bucket_versioning(self.bucket, config))

    def versioning_enabled(self) -> bool:
        status = self._call("get_versioning", None, lambda: self.client.get_bucket_versioning(self.bucket)).status
        return status == ENABLED

    def check(self) -> None:
        """Raise a clear error when the endpoint is unreachable, the keys are wrong or the bucket is missing."""
        if not self._call("bucket_exists", None, lambda: self.client.bucket_exists(self.bucket)):
            raise BucketMissingError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")

    # -- objects ------------------------------------------------------------------------------------

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def presigned_url(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        """A time-limited http(s) GET URL of an object: a browser opens it without the keys (SigV4 query)."""
        from datetime import timedelta

        expires = timedelta(seconds=expires_s)
        return self._call("presign", key, lambda: self.client.presigned_get_object(self.bucket, key, expires=expires))

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        ctype = content_type or content_type_for(key)
        self._call(
            "put",
            key,
            lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=ctype),
        )
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("get", key, read)

    def exists(self, key: str) -> bool:
        try:
            self._call("stat", key, lambda: self.client.stat_object(self.bucket, key))
        except ObjectMissingError:
            return False
        return True

    def size(self, key: str) -> int:
        """The object's size in bytes from a HEAD (nothing is read): a size cap checked before the GET."""
        return self._call("stat", key, lambda: self.client.stat_object(self.bucket, key)).size

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Object keys under ``prefix``, sorted."""
        return sorted(self.iter_keys(prefix, recursive))

    def iter_keys(self, prefix: str = "", recursive: bool = True) -> Iterator[str]:
        objects = self._call(
            "list", prefix, lambda: list(self.client.list_objects(self.bucket, prefix=prefix, recursive=recursive))
        )
        return (o.object_name for o in objects)

    def delete(self, key: str) -> None:
        """Remove a derived object (reports, caches). Raw images and manifests are never deleted."""
        if key.startswith(layout.IMMUTABLE_PREFIXES):
            raise StorageError(f"refusing to delete {self._where(key)}: raw objects and manifests are immutable")
        self._call("delete", key, lambda: self.client.remove_object(self.bucket, key))

    # -- conditional writes (boto3) -----------------------------------------------------------------

    def put_new(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Create ``key`` only if it does not exist (``If-None-Match: *``); returns its ETag.

        Raises `PreconditionFailedError` when another writer created it first. A key that already holds
        exactly ``data`` counts as ours (a retried try whose first attempt landed but whose reply was lost).
        """
        return self._conditional_put(key, data, content_type, {"IfNoneMatch": "*"})

    def put_if_match(self, key: str, data: bytes, etag: str, content_type: str | None = None) -> str:
        """Replace ``key`` only if its ETag is still ``etag`` (``If-Match``); returns the new ETag."""
        return self._conditional_put(key, data, content_type, {"IfMatch": etag})

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """An object's bytes and the ETag of exactly those bytes (for a later ``put_if_match``)."""

        def read() -> tuple[bytes, str]:
            response = self._boto_client().get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read(), response["ETag"]

        return self._boto_call("get", key, read)

    def _conditional_put(self, key: str, data: bytes, content_type: str | None, condition: dict[str, str]) -> str:
        def put() -> str:
            ctype = content_type or content_type_for(key)
            client = self._boto_client()
            return client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=ctype, **condition)["ETag"]

        try:
            return self._boto_call("conditional put", key, put)
        except ObjectMissingError:  # AWS: If-Match on a missing key is 404 NoSuchKey
            raise PreconditionFailedError(f"conditional put {self._where(key)}: the object is gone") from None
        except PreconditionFailedError:
            try:
                current, etag = self.get_with_etag(key)
            except ObjectMissingError:
                raise PreconditionFailedError(f"conditional put {self._where(key)}: the object is gone") from None
            if current != data:
                raise
            return etag

    def _boto_client(self):
        with _BOTO_LOCK:  # creating boto3 clients is not thread-safe
            if self._boto is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    connect_timeout=5,
                    read_timeout=60,
                    retries={"total_max_attempts": 1},  # our own loop retries, with error classification
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",  # older S3 servers reject CRC headers
                )
                self._boto = boto3.session.Session().client("s3", config=config, **self._boto_args)
        return self._boto

    def _boto_call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """``_call`` for the boto3 client: same classification, 412 → `PreconditionFailedError`."""
        from botocore.exceptions import BotoCoreError, ClientError

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in PRECONDITION_CODES or status == 412:
                    raise PreconditionFailedError(f"{what} {self._where(key)}: precondition failed ({code})") from err
                if code in AUTH_ERROR_CODES:
                    raise StorageAccessDenied(
                        f"{what} {self._where(key)} refused ({code}): the {self.identity!r} S3 identity "
                        f"({env_name(self.key_settings[0])}) may not do that, or its keys are wrong"
                    ) from err
                if code == "NoSuchBucket":
                    raise BucketMissingError(f"{what} {self._where(key)}: no bucket {self.bucket!r}") from err
                if code in NOT_FOUND_CODES or status == 404:
                    raise ObjectMissingError(f"{what} {self._where(key)}: no such object") from err
                if (code not in TRANSIENT_ERROR_CODES and status < 500) or attempt == self.retries:
                    raise StorageError(f"{what} {self._where(key)} failed: {code}: {err}") from err
            except BotoCoreError as err:  # connection refused/reset, timeouts: transient
                if attempt == self.retries:
                    raise StorageError(f"{what} {self._where(key)} failed after {attempt + 1} tries: {err}") from err
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    # -- typed helpers ------------------------------------------------------------------------------

    def put_json(self, key: str, obj: Any) -> str:
        return self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_parquet(self, key: str, frame: pd.DataFrame) -> str:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return self.put_bytes(key, buffer.getvalue())

    def get_parquet(self, key: str) -> pd.DataFrame:
        import pandas as pd

        return pd.read_parquet(io.BytesIO(self.get_bytes(key)))

    def put_text(self, key: str, text: str) -> str:
        return self.put_bytes(key, text.encode())
