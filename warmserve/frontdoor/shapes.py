"""Response bodies and server-sent events in the shapes of OpenAI's API (as vLLM's server writes
them), for both endpoints, so the ``openai`` client and existing tools parse them unchanged."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from warmserve.frontdoor.schemas import Parsed

DONE = b"data: [DONE]\n\n"


def sse(payload: dict) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(slots=True)
class Shaper:
    """Builds the bodies of one request's answer; ``id`` and ``created`` are shared by all."""

    parsed: Parsed
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def _head(self) -> dict:
        chat = self.parsed.kind == "chat"
        return {
            "id": self.parsed.generate.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.parsed.model,
        }

    def role_chunk(self) -> dict | None:
        """Chat streams open with an empty assistant delta; completions have no such chunk."""
        if self.parsed.kind != "chat":
            return None
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return {**self._head, "choices": [choice]}

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        """A streamed piece of output (the last one carries ``finish_reason``)."""
        if self.parsed.kind == "chat":
            choice = {"index": 0, "delta": {"content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason, stop_reason=None)
        return {**self._head, "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The extra last chunk ``stream_options.include_usage`` asks for: no choices, usage."""
        return {**self._head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int):
        """The whole answer of a request without ``stream``."""
        if self.parsed.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text}
            kind = "text_completion"
        choice.update(logprobs=None, finish_reason=finish_reason, stop_reason=None)
        return {
            **self._head,
            "object": kind,
            "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens),
        }
