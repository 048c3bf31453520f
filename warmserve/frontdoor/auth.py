"""The front door's API key: ``/v1/*`` answers only requests that carry it, as vLLM's server
does with ``--api-key``; ``/health`` and ``/metrics`` stay open for probes and scrapers."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from warmserve.frontdoor.errors import APIError

GUARDED = "/v1"


class RequireKey:
    """ASGI middleware: a request under ``GUARDED`` without ``Authorization: Bearer <key>`` is
    answered 401 in OpenAI's error shape (the ``openai`` client raises AuthenticationError)
    before any of its body is read. The comparison takes the same time wherever the keys
    differ, so the answer's timing tells nothing about the key."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith(GUARDED)
            and not self._allowed(scope)
        ):
            refused = APIError(
                401, "Missing or invalid API key: send 'Authorization: Bearer <key>'."
            )
            await refused.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False
