"""S3 adapter: documents, chunks and summaries of the asynchronous path, in the documents bucket."""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from precis.domain.errors import InvalidDocumentError, TransientStorageError

_TRANSIENT = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "503", "500"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _translate(exc: ClientError) -> Exception:
    if _code(exc) in _TRANSIENT:
        return TransientStorageError(f"S3 is unavailable: {_code(exc)}")
    return exc


class DocumentStore:
    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def head(self, key: str) -> tuple[int, str] | None:
        """Size and ETag of an object, or None when there is none."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise _translate(exc) from exc
        return int(head["ContentLength"]), str(head["ETag"])

    def read_text(self, key: str, max_bytes: int) -> str:
        """A document as text. Empty, oversized, binary or non-UTF-8 objects are `InvalidDocumentError`."""
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise InvalidDocumentError(f"no document at s3://{self.bucket}/{key}") from exc
            raise _translate(exc) from exc
        size = int(obj["ContentLength"])
        if size == 0:
            obj["Body"].close()
            raise InvalidDocumentError("the document is empty")
        if size > max_bytes:
            obj["Body"].close()
            raise InvalidDocumentError(f"the document has {size} bytes; the limit is {max_bytes}")
        raw: bytes = obj["Body"].read()
        if b"\x00" in raw:
            raise InvalidDocumentError("the document is not text (it contains NUL bytes)")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidDocumentError(f"the document is not UTF-8 text (byte {exc.start})") from exc
        if not text.strip():
            raise InvalidDocumentError("the document is empty")
        return text

    def write_text(self, key: str, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        self._put(key, text.encode(), content_type)

    def write_json(self, key: str, value: Any) -> None:
        self._put(key, json.dumps(value, ensure_ascii=False).encode(), "application/json")

    def read_json(self, key: str) -> Any | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise _translate(exc) from exc
        return json.loads(obj["Body"].read())

    def read_chunk(self, key: str) -> str:
        obj = self.client.get_object(Bucket=self.bucket, Key=key)
        text: str = obj["Body"].read().decode("utf-8")
        return text

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        except ClientError as exc:
            raise _translate(exc) from exc
