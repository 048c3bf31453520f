"""Errors in the body shape of OpenAI's (and vLLM's) API, so the ``openai`` client raises the
matching exception class (``NotFoundError``, ``RateLimitError``...) with our message."""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.responses import Response

# The ``type`` vLLM's server gives each status; the openai client shows it to users.
_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
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

    type: str | None = None  # the body's ``type``, when not the one of its status

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}`` as vLLM writes it."""
        kind = (
            self.type or _TYPES.get(self.status) or HTTPStatus(self.status).phrase.replace(" ", "")
        )
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


class SchemaError(APIError):
    """A body that does not fit the request schema: not a JSON object, a field of the wrong JSON
    type, a required field missing. vLLM's server rejects these in its request model's
    validation, whose 400 has the type "Bad Request" (its own checks of values that fit the
    schema say "BadRequestError"); clients and tests that tell them apart see the same here."""

    type = "Bad Request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message, param)


def internal(request_id: str) -> APIError:
    """The 500 of a failure that is our bug: the request id, which the server's log line
    carries with the traceback, and nothing of the failure itself (no traceback, path or
    exception text reaches a client)."""
    return APIError(500, f"internal error (request id {request_id})")
