"""Request validation: every malformed input becomes an OpenAI-shaped 4xx, never an exception."""

from __future__ import annotations

import json

import pytest

from warmserve.frontdoor.catalog import Catalog
from warmserve.frontdoor.errors import APIError
from warmserve.frontdoor.schemas import parse_json, parse_request
from warmserve.frontdoor.shapes import Shaper, chat_logprobs, completion_logprobs
from warmserve.protocol import TokenChunk


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
    (choice,) = p.choices
    assert (choice.prompt, choice.max_tokens, p.stream) == ("hi", 16, False)
    assert p.request_id.startswith("cmpl-") and choice.request_id.startswith(p.request_id)
    assert choice.add_special_tokens


def test_prompt_forms(catalog):
    as_ids = parse_request("completion", {"model": "tiny-0", "prompt": [[1, 2, 3]]}, catalog)
    assert as_ids.choices[0].prompt_token_ids == [1, 2, 3]
    one = parse_request("completion", {"model": "tiny-0", "prompt": ["x"]}, catalog)
    assert one.choices[0].prompt == "x"
    doc = {"model": "tiny-0", "prompt": ["a", [5, 6]], "n": 2, "seed": 7}
    assert reject("completion", doc, catalog).type == "Bad Request"
    doc["prompt"] = ["a", "b"]
    many = parse_request("completion", doc, catalog)
    assert [(c.prompt, c.seed) for c in many.choices] == [("a", 7), ("a", 8), ("b", 7), ("b", 8)]
    assert len({c.request_id for c in many.choices}) == 4
    assert reject("completion", {"model": "tiny-0", "prompt": [1, -2]}, catalog).status == 400
    assert reject("completion", {"model": "tiny-0"}, catalog).param == "prompt"


def test_chat_uses_the_family_template(catalog):
    doc = {"model": "tiny-1", "messages": [{"role": "user", "content": "hello"}]}
    p = parse_request("chat", doc, catalog)
    (choice,) = p.choices
    assert "hello" in choice.prompt and choice.prompt.endswith("<|assistant|>\n")
    assert not choice.add_special_tokens  # the template wrote what it wants; no extra BOS
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    assert (
        "ab"
        in parse_request("chat", {"model": "tiny-1", "messages": [parts]}, catalog)
        .choices[0]
        .prompt
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
        ({"model": "tiny-0", "prompt": "x", "n": 2, "temperature": 0}, 400, "n"),
        ({"model": "tiny-0", "prompt": "x", "n": 0}, 400, "n"),
        ({"model": "tiny-0", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"model": "tiny-0", "prompt": "x", "logprobs": -2}, 400, "logprobs"),
        ({"model": "tiny-0", "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
        ({"model": "tiny-0", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"model": "tiny-0", "prompt": "x", "min_tokens": 17}, 400, None),
        ({"model": "tiny-0", "prompt": [5] * 513}, 400, "prompt"),
        ({"model": "tiny-0", "prompt": ""}, 400, "prompt"),
        ({"model": "tiny-0", "prompt": "x", "stop": [1]}, 400, "stop"),
        ({"model": "tiny-0", "prompt": "x", "stop": ["a"] * 5}, 400, "stop"),
        (
            {"model": "tiny-0", "prompt": "x", "stream_options": {"include_usage": True}},
            400,
            "stream_options",
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
    shaper = Shaper(chat, "fp")
    assert shaper.role_chunks(None)[0]["choices"][0]["delta"]["role"] == "assistant"
    chunk = shaper.chunk(0, TokenChunk("ab", [5, 6], "length"))
    assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == chat.request_id
    assert chunk["system_fingerprint"] == "fp" and chunk["choices"][0]["stop_reason"] is None
    full = shaper.full([[TokenChunk("ab", [5, 6], "stop", stop_reason="c")]], 3, 2)
    assert full["object"] == "chat.completion" and full["usage"]["total_tokens"] == 5
    assert full["choices"][0]["stop_reason"] == "c"
    json.dumps(full)


def test_logprob_shapes_follow_vllm():
    """The chosen token first, then the ranking: a completion shows one more than asked, a
    chat exactly as many; the prompt's first token has no logprob; -inf is sent as -9999."""
    positions = [[(0, None, "<s>")], [(7, -1.5, "ab"), (8, -1.0, "c"), (9, float("-inf"), "d")]]
    out = completion_logprobs(positions, 1, 10)
    assert out["tokens"] == ["<s>", "ab"] and out["text_offset"] == [10, 13]
    assert out["token_logprobs"] == [None, -1.5]
    assert out["top_logprobs"] == [None, {"ab": -1.5, "c": -1.0}]
    assert completion_logprobs(positions[1:], 2, 0)["top_logprobs"][0]["d"] == -9999.0
    (entry,) = chat_logprobs(positions[1:], 1)["content"]
    assert (entry["token"], entry["bytes"], len(entry["top_logprobs"])) == ("ab", [97, 98], 1)
