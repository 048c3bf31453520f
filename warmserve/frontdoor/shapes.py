"""Response bodies and server-sent events in the shapes of vLLM's OpenAI server, for both
endpoints, so the ``openai`` client and tools built on vLLM parse them unchanged.

An answer has one choice per engine request of :class:`~warmserve.frontdoor.schemas.Parsed`
(index = position in ``parsed.choices``). Streams send each engine chunk as one event, as vLLM
does; whole answers join a choice's chunks. Logprobs keep vLLM's quirks: a completion shows the
chosen token plus ``logprobs`` alternatives (its ``text_offset`` counts every token's text, a
BOS too), a chat shows the first ``top_logprobs`` of the same ranking, and a logprob below
-9999 (minus infinity) is sent as -9999.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from warmserve.frontdoor.schemas import Parsed
from warmserve.protocol import Position, TokenChunk

DONE = b"data: [DONE]\n\n"
FLOOR = -9999.0  # what vLLM sends for a logprob of minus infinity


def sse(payload: dict) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(positions: list[Position], shown: int, offset: int) -> dict:
    """``logprobs`` of a completion choice: per token its text, logprob, the chosen token and
    ``shown`` alternatives by text, and where its text starts (from ``offset``)."""
    out: dict[str, list] = {
        "text_offset": [],
        "token_logprobs": [],
        "tokens": [],
        "top_logprobs": [],
    }
    for position in positions:
        _, logprob, token = position[0]
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        if logprob is None:  # the prompt's first token
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(max(logprob, FLOOR))
        ranked = position[: shown + 1]
        out["top_logprobs"].append({text: max(lp, FLOOR) for _, lp, text in ranked})
    return out


def chat_logprobs(positions: list[Position], shown: int) -> dict:
    """``logprobs`` of a chat choice: per token its text, logprob, UTF-8 bytes and the first
    ``shown`` entries of vLLM's ranking (the chosen token first)."""

    def entry(token: str, logprob: float) -> dict:
        encoded = list(token.encode("utf-8", "replace"))
        return {"token": token, "logprob": max(logprob, FLOOR), "bytes": encoded}

    content = []
    for position in positions:
        _, logprob, token = position[0]
        top = [entry(text, lp) for _, lp, text in position[:shown]]
        content.append({**entry(token, logprob), "top_logprobs": top})
    return {"content": content}


@dataclass(slots=True)
class Shaper:
    """Builds the bodies of one request's answer; ``id`` and ``created`` are shared by all.

    ``fingerprint`` is the ``system_fingerprint`` of the model's answers."""

    parsed: Parsed
    fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))
    _echoed: set[int] = field(default_factory=set)
    _offsets: dict[int, int] = field(default_factory=dict)  # next text offset, per choice

    @property
    def _chat(self) -> bool:
        return self.parsed.kind == "chat"

    @property
    def _head(self) -> dict:
        return {
            "id": self.parsed.request_id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": self.created,
            "model": self.parsed.model,
        }

    def _piece(self, index: int, chunk: TokenChunk) -> tuple[str, list[Position] | None]:
        """The text and logprobs ``chunk`` adds to choice ``index``: with ``echo``, the first
        piece starts with the prompt (and is only the prompt for ``max_tokens`` 0)."""
        text = chunk.text
        positions = chunk.logprobs if self.parsed.logprobs is not None else None
        if self.parsed.echo and index not in self._echoed:
            self._echoed.add(index)
            # vLLM leaves the prompt's text out when it returns the prompt's token ids.
            prompt = "" if self.parsed.return_token_ids else chunk.prompt_text or ""
            prompt_positions = chunk.prompt_logprobs or []
            if self.parsed.echo_only:
                return prompt, prompt_positions if positions is not None else None
            text = prompt + text
            if positions is not None:
                positions = [*prompt_positions, *positions]
        return text, positions

    def _logprobs(self, index: int, positions: list[Position] | None) -> dict | None:
        if positions is None:
            return None
        shown = self.parsed.logprobs or 0
        if self._chat:
            return chat_logprobs(positions, shown)
        out = completion_logprobs(positions, shown, self._offsets.get(index, 0))
        if out["tokens"]:
            self._offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def role_chunks(self, prompt_token_ids: list[int] | None) -> list[dict]:
        """Chat streams open with an empty assistant delta per choice (with the prompt's token
        ids if asked); completions have none."""
        if not self._chat:
            return []
        extra = {"prompt_token_ids": prompt_token_ids} if self.parsed.return_token_ids else {}
        return [
            {
                **self._head,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
                **extra,
            }
            for i in range(len(self.parsed.choices))
        ]

    def chunk(self, index: int, chunk: TokenChunk) -> dict:
        """A streamed piece of choice ``index`` (its last one carries ``finish_reason``)."""
        text, positions = self._piece(index, chunk)
        choice: dict = {"index": index}
        choice.update({"delta": {"content": text}} if self._chat else {"text": text})
        choice.update(logprobs=self._logprobs(index, positions), finish_reason=chunk.finish_reason)
        body = {**self._head, "choices": [choice]}
        if chunk.finish_reason is not None or not self._chat:
            choice["stop_reason"] = chunk.stop_reason
        if not self._chat and (self.parsed.return_token_ids or self.parsed.echo):
            choice["prompt_token_ids"] = chunk.prompt_token_ids  # vLLM streams them with echo
        if self.parsed.return_token_ids:
            choice["token_ids"] = chunk.token_ids
        if chunk.finish_reason is not None and not self.parsed.include_usage:
            body["system_fingerprint"] = self.fingerprint
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The extra last chunk ``stream_options.include_usage`` asks for: no choices, usage."""
        return {
            **self._head,
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens),
            "system_fingerprint": self.fingerprint,
        }

    def full(self, outputs: list[list[TokenChunk]], prompt_tokens: int, completion_tokens: int):
        """The whole answer of a request without ``stream``: ``outputs`` are each choice's
        chunks."""
        choices = []
        for index, chunks in enumerate(outputs):
            texts: list[str] = []
            positions: list[Position] | None = None
            for chunk in chunks:
                text, more = self._piece(index, chunk)
                texts.append(text)
                if more is not None:
                    positions = [*(positions or []), *more]
            if positions is None and self.parsed.logprobs is not None:
                positions = []
            last = chunks[-1] if chunks else TokenChunk("", [])
            choice: dict = {"index": index}
            text = "".join(texts)
            if self._chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice.update(
                logprobs=self._logprobs(index, positions),
                finish_reason=last.finish_reason or "length",
                stop_reason=last.stop_reason,
            )
            if self.parsed.return_token_ids:
                choice["token_ids"] = [t for chunk in chunks for t in chunk.token_ids]
                if not self._chat:
                    choice["prompt_token_ids"] = chunks[0].prompt_token_ids if chunks else None
            choices.append(choice)
        body = {
            **self._head,
            "object": "chat.completion" if self._chat else "text_completion",
            "choices": choices,
            "system_fingerprint": self.fingerprint,
            "usage": usage(prompt_tokens, completion_tokens),
        }
        if self.parsed.return_token_ids and self._chat:  # one prompt, at the top as in vLLM
            body["prompt_token_ids"] = outputs[0][0].prompt_token_ids if outputs[0] else None
        return body
