"""The request path's wire shapes: a chunk survives its message body, chunks fold into one."""

from __future__ import annotations

from warmserve.protocol import TokenChunk, chunk_to_wire, fold


def test_a_chunk_survives_its_message_body():
    plain = TokenChunk("a", [1])
    first = TokenChunk(
        "b", [2], prompt_tokens=3, prompt_token_ids=[7, 8, 9], logprobs=[[(2, -0.5, "b")]]
    )
    last = TokenChunk("", [], finish_reason="stop", stop_reason="\n")
    for chunk in (plain, first, last):
        assert TokenChunk(**chunk_to_wire(chunk)) == chunk
    assert chunk_to_wire(plain) == {"text": "a", "token_ids": [1]}  # nothing unset is sent


def test_chunks_fold_into_the_stream_they_came_from():
    chunks = [
        TokenChunk("He", [1], prompt_tokens=4, prompt_text="hi", logprobs=[[(1, -0.1, "He")]]),
        TokenChunk("llo", [2, 3], logprobs=[[(2, -0.2, "l")], [(3, -0.3, "lo")]]),
        TokenChunk("!", [4], finish_reason="length", logprobs=[[(4, -0.4, "!")]]),
    ]
    folded = fold(chunks)
    assert (folded.text, folded.token_ids) == ("Hello!", [1, 2, 3, 4])
    assert (folded.prompt_tokens, folded.prompt_text, folded.finish_reason) == (4, "hi", "length")
    assert [p[0][0] for p in folded.logprobs or []] == [1, 2, 3, 4]
    assert fold(chunks[1:2]) is chunks[1]
    assert fold([TokenChunk("a", [1]), TokenChunk("b", [2])]).logprobs is None
