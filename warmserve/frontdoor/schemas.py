"""Validation of completion and chat requests into a :class:`Parsed` request.

Hand-written rather than pydantic models so each rejection names the field and says what was
wrong in words a client can act on, and so that no client input can raise anything but
:class:`~warmserve.frontdoor.errors.APIError` (a 500 for bad input would be our bug). What vLLM's
OpenAI server rejects is rejected with its status and error type (``SchemaError`` for what its
request model refuses); fields that would change the answer in ways this server does not
produce (tools, ``response_format``, ``suffix``) are rejected rather than silently ignored.
An OpenAI request becomes one engine request per choice: ``n`` samples of
each prompt, as vLLM's engine fans them out itself (sample ``i`` seeded ``seed + i``).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import TemplateError

from warmserve.frontdoor.catalog import Catalog, ModelInfo
from warmserve.frontdoor.errors import APIError, SchemaError
from warmserve.protocol import GenerateRequest

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to the room left
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 20  # vLLM's default ``max_logprobs``
MAX_CHOICES = 128  # engine requests one OpenAI request may fan out to (prompts times n)
INT64 = (-(2**63), 2**63 - 1)  # what a seed may be (msgpack and the engine take 64 bits)
_ROLES = {"system", "developer", "user", "assistant", "tool"}
# Fields that would change the answer's shape in ways this server does not produce: rejected
# when set to anything but their default. (``best_of`` is not among them: vLLM 0.32's engine has
# no best_of; its server ignores the field, and so does this one.)
_UNSUPPORTED_IF_SET = {
    "completion": ("suffix",),
    "chat": ("tools", "tool_choice", "response_format"),
}

Kind = Literal["completion", "chat"]


@dataclass(slots=True)
class Parsed:
    """A validated request: the engine request of each choice, plus how to shape the answer."""

    kind: Kind
    request_id: str
    model: str
    choices: list[GenerateRequest]  # in the answer's order: the n samples of each prompt in turn
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # alternatives shown per token; None: no logprobs
    echo_only: bool = False  # ``echo`` with ``max_tokens`` 0: the prompt is the whole text
    return_token_ids: bool = False  # vLLM's extension: token ids beside the text

    @property
    def echo(self) -> bool:
        return self.choices[0].echo


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or 400."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise SchemaError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise SchemaError("request body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise SchemaError("request body must be a JSON object")
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
    if n < 1:
        raise APIError(400, f"n must be at least 1, got {n}.", "n")

    echo = False
    if kind == "completion":
        prompts = _prompts(doc.get("prompt"))
        limit_name = "max_tokens"
        max_tokens = _get(doc, "max_tokens", int, default=DEFAULT_MAX_TOKENS)
        echo = _get(doc, "echo", bool, default=False)
        logprobs = _logprobs(_number(doc, "logprobs"), "logprobs", info)
    else:
        prompts = [(_render(info, _messages(doc.get("messages"))), None)]
        given = doc.get("max_completion_tokens") is not None
        limit_name = "max_completion_tokens" if given else "max_tokens"
        max_tokens = _get(doc, limit_name, int, default=None)
        logprobs = _chat_logprobs(doc, info)
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices (prompts times n) per request", "n")
    echo_only = echo and max_tokens == 0
    if max_tokens is not None and not echo_only:
        _check_max_tokens(max_tokens, limit_name, info)

    sampling = _sampling(doc, n, info)
    stream, include_usage = _streaming(doc)
    seed = _get(doc, "seed", int, default=None)
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise SchemaError("`seed` must fit in 64 bits", "seed")
    return_token_ids = _get(doc, "return_token_ids", bool, default=False)

    request_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    choices = []
    wanted = 1 if echo_only else max_tokens  # vLLM runs one token it does not show
    for prompt, token_ids in prompts:
        room = _room(info, prompt, token_ids, wanted, limit_name, special=kind == "completion")
        if sampling["min_tokens"] > room:
            message = "min_tokens must be less than or equal to max_tokens"
            raise APIError(400, f"{message}={room}, got {sampling['min_tokens']}.")
        for i in range(n):
            choices.append(
                GenerateRequest(
                    request_id=f"{request_id}-{len(choices)}",
                    model=model,
                    prompt=prompt,
                    prompt_token_ids=token_ids,
                    max_tokens=room,
                    seed=None if seed is None else seed + i,
                    logprobs=logprobs,
                    echo=echo,
                    return_token_ids=return_token_ids,
                    add_special_tokens=kind == "completion",
                    **sampling,
                )
            )
    return Parsed(
        kind,
        request_id,
        model,
        choices,
        n,
        stream,
        include_usage,
        logprobs,
        echo_only,
        return_token_ids,
    )


def _sampling(doc: dict[str, Any], n: int, info: ModelInfo) -> dict[str, Any]:
    """The sampling fields shared by every choice, as ``GenerateRequest`` names them."""
    temperature = _get(doc, "temperature", float, default=1.0)
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, f"temperature must be in [0, 2], got {temperature}.", "temperature")
    if n > 1 and temperature == 0.0:  # vLLM's check: 1e-6 samples n times, nearly greedily
        raise APIError(400, f"n must be 1 when using greedy sampling, got {n}.", "n")
    top_p = _get(doc, "top_p", float, default=1.0)
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}.", "top_p")
    top_k = _get(doc, "top_k", int, default=0)
    if top_k < -1:
        raise APIError(400, f"top_k must be 0 (disable), or at least 1, got {top_k}.", "top_k")
    min_p = _get(doc, "min_p", float, default=0.0)
    if not 0.0 <= min_p <= 1.0:
        raise APIError(400, f"min_p must be in [0, 1], got {min_p}.", "min_p")
    min_tokens = _get(doc, "min_tokens", int, default=0)
    if min_tokens < 0:
        raise APIError(400, f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    stop_token_ids = _get(doc, "stop_token_ids", list, default=[])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise SchemaError("`stop_token_ids` must be a list of integers", "stop_token_ids")
    _check_vocabulary(stop_token_ids, "stop_token_ids", info)
    return {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "min_tokens": min_tokens,
        "stop": _stop(doc.get("stop")),
        "stop_token_ids": stop_token_ids,
        "include_stop_str_in_output": _get(doc, "include_stop_str_in_output", bool, default=False),
        "ignore_eos": _get(doc, "ignore_eos", bool, default=False),
        "logit_bias": _logit_bias(doc, info),
        **{name: _penalty(doc, name) for name in _PENALTIES},
    }


def _logit_bias(doc: dict[str, Any], info: ModelInfo) -> list[tuple[int, float]]:
    """``logit_bias`` as (token id, bias) pairs, each bias cut to [-100, 100] as vLLM does."""
    value = _get(doc, "logit_bias", dict, default={})
    pairs = []
    for key, bias in value.items():
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise SchemaError(f"`logit_bias[{key!r}]` must be a number", "logit_bias")
        try:
            token_id = int(key)
        except ValueError:
            message = "logit_bias contains key(s) that cannot be converted to integer token IDs"
            raise APIError(400, f"{message}: {key!r}", "logit_bias") from None
        pairs.append((token_id, min(100.0, max(-100.0, float(bias)))))
    _check_vocabulary([token_id for token_id, _ in pairs], "logit_bias", info)
    return pairs


def _check_vocabulary(token_ids: list[int], name: str, info: ModelInfo) -> None:
    bad = [t for t in token_ids if t < 0 or (info.vocab is not None and t >= info.vocab)]
    if bad:
        raise APIError(400, f"token_id(s) {bad} in {name} contain out-of-vocab token ids.", name)


def _streaming(doc: dict[str, Any]) -> tuple[bool, bool]:
    """(``stream``, ``stream_options.include_usage``)."""
    stream = _get(doc, "stream", bool, default=False)
    options = _get(doc, "stream_options", dict, default={})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise SchemaError("`stream_options.include_usage` must be a boolean", "stream_options")
    if options and not stream:
        message = "Stream options can only be defined when `stream=True`."
        raise APIError(400, message, "stream_options")
    return stream, include_usage


_PENALTIES = {  # name: (default, low, high, whether low itself is allowed)
    "presence_penalty": (0.0, -2.0, 2.0, True),
    "frequency_penalty": (0.0, -2.0, 2.0, True),
    "repetition_penalty": (1.0, 0.0, float("inf"), False),
}


def _penalty(doc: dict[str, Any], name: str) -> float:
    default, low, high, closed = _PENALTIES[name]
    value = _get(doc, name, float, default=default)
    if not (low <= value if closed else low < value) or not value <= high:
        bounds = f"in [{low:g}, {high:g}]" if closed else f"greater than {low:g}"
        raise APIError(400, f"{name} must be {bounds}, got {value}.", name)
    return value


def _check_max_tokens(max_tokens: int, name: str, info: ModelInfo) -> None:
    if max_tokens < 1:
        raise APIError(400, f"{name} must be at least 1, got {max_tokens}.", name)
    if max_tokens > info.context:
        raise APIError(
            400,
            f"{name}={max_tokens} cannot be greater than max_model_len={info.context}. "
            "Please request fewer output tokens.",
            name,
        )


def _room(
    info: ModelInfo,
    prompt: str | None,
    token_ids: list[int] | None,
    max_tokens: int | None,
    limit_name: str,
    special: bool,
) -> int:
    """The completion tokens a choice may take: ``max_tokens`` (chat: unset means all), cut to
    what the context leaves after the prompt, as vLLM's server does; 400 for a prompt that
    leaves nothing. Unknown prompt lengths (no tokenizer) are left to the engine."""
    wanted = info.context if max_tokens is None else max_tokens
    where = "prompt" if special else "messages"
    if prompt is not None:
        _check_text(prompt, where)
        prompt_len = info.prompt_tokens(prompt, info.context - wanted, special)
    else:
        assert token_ids is not None
        if info.vocab is not None and max(token_ids) >= info.vocab:
            raise APIError(400, f"Token id {max(token_ids)} is out of vocabulary")
        prompt_len = len(token_ids)
    if prompt_len is None:
        return DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if prompt_len > info.context:
        raise APIError(
            400,
            f"This model's maximum context length is {info.context} tokens. However, your "
            f"prompt contains {prompt_len} input tokens, which exceeds this limit even without "
            "any output tokens. Please reduce the length of the input prompt.",
            where,
        )
    room = min(wanted, info.context - prompt_len)
    if room < 1:
        raise APIError(400, f"{limit_name} must be at least 1, got {room}.", limit_name)
    return room


def _number(doc: dict[str, Any], name: str) -> int | None:
    """An integer field that vLLM checks before its schema does: any non-number is a
    BadRequestError there, not a schema error."""
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f"`{name}` must be an integer.", name)
    if isinstance(value, float):
        if not value.is_integer():
            raise SchemaError(f"`{name}` must be an integer, got a fraction", name)
        return int(value)
    return value


def _logprobs(value: int | None, name: str, info: ModelInfo) -> int | None:
    """Alternatives per token the engine is asked for: -1 means the whole vocabulary, which
    is more than vLLM's limit for any real model, as anything above ``MAX_LOGPROBS``."""
    if value is None:
        return None
    if value < -1:
        raise APIError(400, f"`{name}` must be a positive value or -1.", name)
    asked = (info.vocab or INT64[1]) if value == -1 else value
    if asked > MAX_LOGPROBS:
        message = f"Requested sample logprobs of {asked}, which is greater than max allowed: "
        raise APIError(400, f"{message}{MAX_LOGPROBS}", "logprobs")
    return asked


def _chat_logprobs(doc: dict[str, Any], info: ModelInfo) -> int | None:
    """Chat's ``logprobs`` (a switch) and ``top_logprobs`` (how many alternatives)."""
    wanted = _get(doc, "logprobs", bool, default=False)
    top = _number(doc, "top_logprobs")
    if top is not None and top < -1:
        raise APIError(400, "`top_logprobs` must be a positive value or -1.", "top_logprobs")
    if top is not None and top != 0 and not wanted:
        message = "when using `top_logprobs`, `logprobs` must be set to true."
        raise APIError(400, message, "top_logprobs")
    return _logprobs(top or 0, "top_logprobs", info) if wanted else None


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _get(doc: dict[str, Any], name: str, typ: type, *, default: Any = None, required=False):
    """``doc[name]`` checked against ``typ`` (``None`` means absent); 400 naming the field."""
    value = doc.get(name)
    if value is None:
        if required:
            raise SchemaError(f"`{name}` is required", name)
        return default
    ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise SchemaError(f"`{name}` is out of range", name) from None
    if not ok:
        want = _TYPE_WORDS.get(typ, "an object")
        raise SchemaError(f"`{name}` must be {want}, got {type(value).__name__}", name)
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
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    )


def _prompts(value: Any) -> list[tuple[str | None, list[int] | None]]:
    """The prompts of a completion request, each as (text, None) or (None, token ids): a
    string, a list of strings, a list of token ids or a list of such lists, as vLLM takes."""
    if value is None or value == "":
        message = "Either prompt or prompt_embeds must be provided and non-empty."
        raise APIError(400, message, "prompt")
    if isinstance(value, str):
        return [(value, None)]
    if _token_list(value) and value:
        return [(None, list(value))]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return [(p, None) for p in value]
    if isinstance(value, list) and value and all(_token_list(p) and p for p in value):
        return [(None, list(p)) for p in value]
    message = "`prompt` must be a string, a list of strings, token ids or lists of token ids"
    raise SchemaError(message, "prompt")


def _messages(value: Any) -> list[dict[str, str]]:
    """Chat messages with text content; content given as parts is joined."""
    if value is None:
        raise SchemaError("`messages` is required", "messages")
    if not isinstance(value, list):
        raise SchemaError("`messages` must be a list", "messages")
    if not value:
        message = "Cannot apply chat template to an empty conversation. Provide a message."
        raise APIError(400, message, "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise SchemaError(f"`messages[{i}]` must be an object", "messages")
        role = m.get("role")
        if not isinstance(role, str):
            raise SchemaError(f"`messages[{i}].role` must be a string", "messages")
        if role not in _ROLES:
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
            raise SchemaError(f"`messages[{i}].content` must be a string", "messages")
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
        raise SchemaError("`stop` must be a string or a list of non-empty strings", "stop")
    if len(value) > MAX_STOP:
        raise SchemaError(f"`stop` takes at most {MAX_STOP} sequences", "stop")
    for s in value:
        _check_text(s, "stop")
    return value
