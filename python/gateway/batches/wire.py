"""The OpenAI wire shapes: file objects, batch objects, list pages and output-file lines
(`openai.types.FileObject`, `Batch`, the batch output line format)."""

from __future__ import annotations

import os
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode
EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


def _s(v: bytes | None) -> str:
    return v.decode() if v is not None else ""


def _int(v: bytes | None) -> int | None:
    return int(v) if v else None


def file_object(h: dict[str, bytes]) -> dict[str, Any]:
    return {
        "id": _s(h.get("id")),
        "object": "file",
        "bytes": int(h.get("bytes") or 0),
        "created_at": int(h.get("created_at") or 0),
        "filename": _s(h.get("filename")),
        "purpose": _s(h.get("purpose")),
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def batch_object(h: dict[str, bytes], completed: int, failed: int) -> dict[str, Any]:
    """`completed` / `failed`: the live counts (the result hashes) until the batch is final,
    then the stored ones."""
    if h.get("completed") is not None:
        completed, failed = int(h["completed"]), int(h.get("failed") or 0)
    errors = h.get("errors")
    metadata = h.get("metadata")
    return {
        "id": _s(h.get("id")),
        "object": "batch",
        "endpoint": _s(h.get("endpoint")),
        "errors": msgspec.Raw(errors) if errors else None,
        "input_file_id": _s(h.get("input_file_id")),
        "completion_window": _s(h.get("completion_window")),
        "status": _s(h.get("status")),
        "output_file_id": _s(h.get("output_file_id")) or None,
        "error_file_id": _s(h.get("error_file_id")) or None,
        "created_at": int(h.get("created_at") or 0),
        "in_progress_at": _int(h.get("in_progress_at")),
        "expires_at": _int(h.get("expires_at")),
        "finalizing_at": _int(h.get("finalizing_at")),
        "completed_at": _int(h.get("completed_at")),
        "failed_at": _int(h.get("failed_at")),
        "expired_at": _int(h.get("expired_at")),
        "cancelling_at": _int(h.get("cancelling_at")),
        "cancelled_at": _int(h.get("cancelled_at")),
        "request_counts": {"total": int(h.get("total") or 0), "completed": completed, "failed": failed},
        "metadata": msgspec.Raw(metadata) if metadata else None,
    }


def page(data: list[dict[str, Any]], has_more: bool) -> bytes:
    return _encode(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


def _json_or_text(body: bytes) -> Any:
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace")
    return msgspec.Raw(body)


def response_line(custom_id: str, status: int, request_id: str, body: bytes) -> bytes:
    """A line that ran: its reply, success or not (the error file holds the non-2xx ones)."""
    return _encode(
        {
            "id": "batch_req_" + os.urandom(12).hex(),
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": _json_or_text(body)},
            "error": None,
        }
    )


def error_line(custom_id: str, error: dict[str, str]) -> bytes:
    """A line that never got a reply (expired, cancelled)."""
    return _encode(
        {"id": "batch_req_" + os.urandom(12).hex(), "custom_id": custom_id, "response": None, "error": error}
    )
