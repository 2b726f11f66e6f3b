"""An in-memory bucket behind the real `ObjectStore` code: plain calls over a dict, and a boto3 stand-in
that enforces If-None-Match / If-Match like S3 (412 PreconditionFailed), so the adapter's conditional
paths (error mapping, the retried-write check) run unchanged. The integration tests prove a real server."""

from __future__ import annotations

import hashlib
import io

from botocore.exceptions import ClientError, EndpointConnectionError

from pipelines.io import layout
from pipelines.io.storage import ObjectMissingError, ObjectStore


def etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def client_error(code: str, status: int, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


class FakeBoto:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.lose_replies = 0  # the next N conditional puts land, then their reply is lost

    def put_object(self, *, Bucket, Key, Body, ContentType, IfNoneMatch=None, IfMatch=None):  # noqa: N803
        current = self.objects.get(Key)
        if (IfNoneMatch == "*" and current is not None) or (
            IfMatch is not None and (current is None or etag(current) != IfMatch)
        ):
            raise client_error("PreconditionFailed", 412, "PutObject")
        self.objects[Key] = Body
        if self.lose_replies:
            self.lose_replies -= 1
            raise EndpointConnectionError(endpoint_url="http://memory")
        return {"ETag": etag(Body)}

    def get_object(self, *, Bucket, Key):  # noqa: N803
        if Key not in self.objects:
            raise client_error("NoSuchKey", 404, "GetObject")
        return {"Body": io.BytesIO(self.objects[Key]), "ETag": etag(self.objects[Key])}


class MemoryBucket(ObjectStore):
    def __init__(self) -> None:
        super().__init__("memory:9", "key", "secret", "memory-bucket", retries=2, backoff_s=0.0)
        self.objects: dict[str, bytes] = {}
        self._boto = FakeBoto(self.objects)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        self.objects[key] = bytes(data)
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        if key not in self.objects:
            raise ObjectMissingError(f"get {key}: no such object")
        return self.objects[key]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def iter_keys(self, prefix: str = "", recursive: bool = True):
        return iter([k for k in self.objects if k.startswith(prefix)])

    def delete(self, key: str) -> None:
        if key.startswith(layout.IMMUTABLE_PREFIXES):
            super().delete(key)  # raises: the adapter's own refusal
        self.objects.pop(key, None)
