"""Validation of completion and chat requests into a :class:`Parsed` request.

Hand-written rather than pydantic models so each rejection names the field and says what was
wrong in words a client can act on, and so that no client input can raise anything but
:class:`~warmserve.frontdoor.errors.APIError` (a 500 for bad input would be our bug). Fields of
OpenAI's API that change the shape of the answer and that this server does not implement
(``n > 1``, ``logprobs``, ``echo``, tools) are rejected rather than silently ignored.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import TemplateError

from warmserve.frontdoor.catalog import Catalog, ModelInfo
from warmserve.frontdoor.errors import APIError
from warmserve.protocol import GenerateRequest

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; toy models rarely stop on their own
MAX_STOP = 4  # OpenAI's limit on stop sequences
INT64 = (-(2**63), 2**63 - 1)  # what a seed may be (msgpack and the engine take 64 bits)
_ROLES = {"system", "developer", "user", "assistant", "tool"}
# Fields that would change the answer's shape in ways this server does not produce: rejected
# when set to anything but their default.
_UNSUPPORTED_IF_SET = {
    "completion": ("logprobs", "echo", "suffix", "logit_bias", "best_of"),
    "chat": ("logprobs", "top_logprobs", "tools", "tool_choice", "logit_bias", "response_format"),
}

Kind = Literal["completion", "chat"]


@dataclass(slots=True)
class Parsed:
    """A validated request: what goes to the engine, plus how to shape the answer."""

    kind: Kind
    generate: GenerateRequest
    stream: bool
    include_usage: bool

    @property
    def model(self) -> str:
        return self.generate.model


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or 400."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise APIError(400, "request body must be a JSON object")
    return doc


def parse_request(kind: Kind, doc: dict[str, Any], catalog: Catalog) -> Parsed:
    """Validate ``doc`` for endpoint ``kind`` against the models in ``catalog``."""
    model = _get(doc, "model", str, required=True)
    if model not in catalog:
        raise APIError(404, f"The model `{model}` does not exist.", param="model")
    info = catalog[model]
    for name in _UNSUPPORTED_IF_SET[kind]:
        if doc.get(name) not in (None, False, 0, [], {}):
            raise APIError(400, f"`{name}` is not supported by this server", param=name)
    n = _get(doc, "n", int, default=1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")

    prompt: str | None = None
    token_ids: list[int] | None = None
    if kind == "completion":
        prompt, token_ids = _prompt(doc.get("prompt"))
        max_tokens = _get(doc, "max_tokens", int, default=DEFAULT_MAX_TOKENS)
        limit_name = "max_tokens"
    else:
        prompt = _render(info, _messages(doc.get("messages")))
        max_tokens = _get(doc, "max_completion_tokens", int, default=None)
        limit_name = "max_completion_tokens"
        if max_tokens is None:
            max_tokens = _get(doc, "max_tokens", int, default=DEFAULT_MAX_TOKENS)
            limit_name = "max_tokens"
    if max_tokens <= 0:
        raise APIError(400, f"`{limit_name}` must be at least 1, got {max_tokens}", limit_name)
    if max_tokens >= info.context:
        raise APIError(
            400,
            f"`{limit_name}` is {max_tokens}, but {model} is served with a context of "
            f"{info.context} tokens (prompt included)",
            limit_name,
        )
    if prompt is not None:
        _check_text(prompt, "prompt" if kind == "completion" else "messages")
        prompt_len = info.prompt_tokens(prompt, info.context - max_tokens)
    else:
        assert token_ids is not None
        if info.vocab is not None and max(token_ids) >= info.vocab:
            raise APIError(400, f"token ids of {model} are below {info.vocab}", "prompt")
        prompt_len = len(token_ids)
    if prompt_len is not None and prompt_len + max_tokens > info.context:
        where = "prompt" if kind == "completion" else "messages"
        raise APIError(
            400,
            f"{model} is served with a context of {info.context} tokens, but this request "
            f"asks for {prompt_len + max_tokens} or more ({prompt_len} in the {where}, "
            f"{max_tokens} in the completion); shorten the {where} or lower `{limit_name}`",
            limit_name,
        )

    temperature = _get(doc, "temperature", float, default=1.0)
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, "`temperature` must be between 0 and 2", "temperature")
    top_p = _get(doc, "top_p", float, default=1.0)
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, "`top_p` must be in (0, 1]", "top_p")
    stream = _get(doc, "stream", bool, default=False)
    options = _get(doc, "stream_options", dict, default={})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "`stream_options.include_usage` must be a boolean", "stream_options")
    if options and not stream:
        raise APIError(400, "`stream_options` is only allowed with `stream: true`", "stream")

    seed = _get(doc, "seed", int, default=None)
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise APIError(400, "`seed` must fit in 64 bits", "seed")
    generate = GenerateRequest(
        request_id=f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}",
        model=model,
        prompt=prompt,
        prompt_token_ids=token_ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=_stop(doc.get("stop")),
        ignore_eos=_get(doc, "ignore_eos", bool, default=False),
    )
    return Parsed(kind, generate, stream, include_usage)


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _get(doc: dict[str, Any], name: str, typ: type, *, default: Any = None, required=False):
    """``doc[name]`` checked against ``typ`` (``None`` means absent); 400 naming the field."""
    value = doc.get(name)
    if value is None:
        if required:
            raise APIError(400, f"`{name}` is required", name)
        return default
    ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise APIError(400, f"`{name}` is out of range", name) from None
    if not ok:
        want = _TYPE_WORDS.get(typ, "an object")
        raise APIError(400, f"`{name}` must be {want}, got {type(value).__name__}", name)
    return value


def _check_text(text: str, param: str) -> None:
    """400 for text that is no valid Unicode (a lone surrogate, which JSON escapes can carry):
    neither the tokenizer nor the comm to the worker could encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        message = f"`{param}` contains invalid Unicode (a lone surrogate)"
        raise APIError(400, message, param) from None


def _token_list(value: Any) -> bool:
    return bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    )


def _prompt(value: Any) -> tuple[str | None, list[int] | None]:
    """One prompt: text or token ids, optionally wrapped in a one-element list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and _token_list(value):
        return None, list(value)
    if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
        raise APIError(400, "only one prompt per request is supported", "prompt")
    if value is None:
        raise APIError(400, "`prompt` is required", "prompt")
    raise APIError(
        400, "`prompt` must be a string or a non-empty list of token ids (integers >= 0)", "prompt"
    )


def _messages(value: Any) -> list[dict[str, str]]:
    """Chat messages with text content; content given as parts is joined."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "`messages` must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise APIError(400, f"`messages[{i}]` must be an object", "messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise APIError(400, f"`messages[{i}].role` must be one of {sorted(_ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise APIError(400, f"`messages[{i}].content` parts must be text parts", "messages")
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"`messages[{i}].content` must be a string", "messages")
        out.append({"role": role, "content": content})
    return out


def _render(info: ModelInfo, messages: list[dict[str, str]]) -> str:
    try:
        return info.render_chat(messages)
    except TemplateError as e:
        raise APIError(400, f"cannot apply the chat template of {info.spec.name}: {e}") from None


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise APIError(400, "`stop` must be a string or a list of non-empty strings", "stop")
    if len(value) > MAX_STOP:
        raise APIError(400, f"`stop` takes at most {MAX_STOP} sequences", "stop")
    for s in value:
        _check_text(s, "stop")
    return value
