"""Errors as the OpenAI API sends them: `{"error": {"message", "type", "param", "code"}}` with a
4xx status when the client can fix it, so the official clients raise their usual exceptions."""

from __future__ import annotations

import logging
from typing import Any

from edgelmm.errors import EdgelmmError, RequestError

log = logging.getLogger("edgelmm.serve")


class ApiError(Exception):
    """An error the client caused or must hear about, with its HTTP status and OpenAI error type."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def as_api_error(exc: BaseException) -> ApiError:
    """What a failure inside a request means to the client: its own mistake (400), or ours (500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        return ApiError(400, str(exc), code=exc.code, param=exc.param)
    if isinstance(exc, EdgelmmError):
        return ApiError(400, str(exc))
    log.exception("request failed inside the engine", exc_info=exc)
    return ApiError(500, f"internal error in the engine ({type(exc).__name__}); the server keeps serving", "server_error")
