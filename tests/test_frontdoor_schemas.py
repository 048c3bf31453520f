"""Request validation: every malformed input becomes an OpenAI-shaped 4xx, never an exception."""

from __future__ import annotations

import json

import pytest

from warmserve.frontdoor.catalog import Catalog
from warmserve.frontdoor.errors import APIError
from warmserve.frontdoor.schemas import parse_json, parse_request
from warmserve.frontdoor.shapes import Shaper


@pytest.fixture(scope="module")
def catalog(tiny_registry) -> Catalog:
    return Catalog(tiny_registry)


def reject(kind, doc, catalog) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(kind, doc, catalog)
    body = info.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["code"] == info.value.status
    return info.value


def test_completion_defaults(catalog):
    p = parse_request("completion", {"model": "tiny-0", "prompt": "hi"}, catalog)
    assert (p.generate.prompt, p.generate.max_tokens, p.stream) == ("hi", 16, False)
    assert p.generate.request_id.startswith("cmpl-")


def test_prompt_forms(catalog):
    as_ids = parse_request("completion", {"model": "tiny-0", "prompt": [[1, 2, 3]]}, catalog)
    assert as_ids.generate.prompt_token_ids == [1, 2, 3]
    one = parse_request("completion", {"model": "tiny-0", "prompt": ["x"]}, catalog)
    assert one.generate.prompt == "x"
    assert reject("completion", {"model": "tiny-0", "prompt": ["a", "b"]}, catalog).status == 400
    assert reject("completion", {"model": "tiny-0", "prompt": [1, -2]}, catalog).status == 400
    assert reject("completion", {"model": "tiny-0"}, catalog).param == "prompt"


def test_chat_uses_the_family_template(catalog):
    doc = {"model": "tiny-1", "messages": [{"role": "user", "content": "hello"}]}
    p = parse_request("chat", doc, catalog)
    assert "hello" in p.generate.prompt and p.generate.prompt.endswith("<|assistant|>\n")
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    assert (
        "ab"
        in parse_request("chat", {"model": "tiny-1", "messages": [parts]}, catalog).generate.prompt
    )


@pytest.mark.parametrize(
    "doc, status, param",
    [
        ({"prompt": "x"}, 400, "model"),
        ({"model": 3, "prompt": "x"}, 400, "model"),
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "tiny-0", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny-0", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
        ({"model": "tiny-0", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "tiny-0", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": "tiny-0", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
        ({"model": "tiny-0", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": "tiny-0", "prompt": "x", "temperature": 7}, 400, "temperature"),
        ({"model": "tiny-0", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": "tiny-0", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"model": "tiny-0", "prompt": "x", "n": 2}, 400, "n"),
        ({"model": "tiny-0", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
        ({"model": "tiny-0", "prompt": "x", "stop": [1]}, 400, "stop"),
        ({"model": "tiny-0", "prompt": "x", "stop": ["a"] * 5}, 400, "stop"),
        (
            {"model": "tiny-0", "prompt": "x", "stream_options": {"include_usage": True}},
            400,
            "stream",
        ),
    ],
)
def test_completion_rejections(catalog, doc, status, param):
    err = reject("completion", doc, catalog)
    assert (err.status, err.param) == (status, param)


@pytest.mark.parametrize(
    "messages",
    [None, [], "hi", [3], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]],
)
def test_chat_rejections(catalog, messages):
    assert reject("chat", {"model": "tiny-0", "messages": messages}, catalog).param == "messages"


@pytest.mark.parametrize("body", [b"{", b"[1, 2]", b"\xff\xfe", b"", b"null"])
def test_body_must_be_a_json_object(body):
    with pytest.raises(APIError) as info:
        parse_json(body)
    assert info.value.status == 400


def test_stream_chunk_shapes(catalog):
    chat = parse_request(
        "chat", {"model": "tiny-0", "messages": [{"role": "user", "content": "x"}]}, catalog
    )
    shaper = Shaper(chat)
    assert shaper.role_chunk()["choices"][0]["delta"]["role"] == "assistant"
    chunk = shaper.chunk("ab", "length")
    assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == chat.generate.request_id
    full = shaper.full("ab", "length", 3, 2)
    assert full["object"] == "chat.completion" and full["usage"]["total_tokens"] == 5
    json.dumps(full)
