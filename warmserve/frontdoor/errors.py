"""Errors in the body shape of OpenAI's (and vLLM's) API, so the ``openai`` client raises the
matching exception class (``NotFoundError``, ``RateLimitError``...) with our message."""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.responses import Response

# The ``type`` vLLM's server gives each status; the openai client shows it to users.
_TYPES: dict[int, str] = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "RequestEntityTooLarge",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeout",
}


class APIError(Exception):
    """An answer other than success, raised anywhere on the request path, sent as JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}`` as vLLM writes it."""
        kind = _TYPES.get(self.status) or HTTPStatus(self.status).phrase.replace(" ", "")
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self) -> Response:
        """The body as ASCII JSON: a message may quote client input that is no valid Unicode
        (a lone surrogate), which UTF-8 cannot encode but a JSON escape can."""
        return Response(
            json.dumps(self.body()),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )
