"""S3 object-storage adapter: the only module that imports ``minio``.

Works against any S3 endpoint (SeaweedFS in the embedded stack, MinIO in compose, AWS). Every call
retries transient failures with exponential backoff; credential and bucket errors are raised at once
with a message that names the endpoint, the bucket and what to fix.

S3 makes a PUT visible only when it completes (single-part and multipart alike), so a reader never sees
a partial object; ``put_*`` therefore write straight to their final key. Originals and manifests
(``layout.IMMUTABLE_PREFIXES``) are never deleted through the adapter.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from pipelines.core.errors import LeukopsError
from pipelines.io import layout

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import Settings

T = TypeVar("T")

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


class BucketMissingError(StorageError):
    pass


class ObjectMissingError(StorageError, KeyError):
    pass


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_type_for(key: str) -> str:
    dot = key.rfind(".")
    return CONTENT_TYPES.get(key[dot:].lower(), "application/octet-stream") if dot >= 0 else "application/octet-stream"


class ObjectStore:
    """One bucket on one S3 endpoint."""

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
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
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

    @classmethod
    def from_settings(cls, settings: Settings, bucket: str | None = None) -> ObjectStore:
        return cls(
            settings.s3_host,
            settings.secret("s3_access_key"),
            settings.secret("s3_secret_key"),
            bucket or settings.data_bucket,
            region=settings.s3_region,
            secure=settings.s3_secure,
        )

    # -- error handling ---------------------------------------------------------------------------

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{key or ''} at {self.endpoint}"

    def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except S3Error as err:
                if err.code in AUTH_ERROR_CODES:
                    raise StorageAuthError(
                        f"{what} {self._where(key)} refused ({err.code}): check LEUKOPS_S3_ACCESS_KEY / "
                        "LEUKOPS_S3_SECRET_KEY"
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
