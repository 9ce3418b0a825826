"""The text level alone (server/engine/detokenizer.py), no engine: token ids in, text deltas out.
Expected texts come from the tokenizer's whole-sequence decode, not from the class under test."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import byte_level_tokenizer
from server.engine.detokenizer import TextProcessor
from server.engine.output_processor import RequestOutput
from server.engine.request import FinishReason, SamplingParams
from server.engine.sampler import TokenLogprobs
from server.model.tokenizer import Tokenizer

PROMPT_TEXT = "The quick brown"
COMPLETION = " fox jumps over the lazy dog. Hello world, hello tokens! 0123456789"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tok")
    byte_level_tokenizer(320).save(str(path / "tokenizer.json"))
    return Tokenizer(path)


def run(tok: Tokenizer, completion_ids: list[int], eos: int | None = None, **params):
    """Feed `completion_ids` one output per token, as the engine's token level makes them (the
    last finished "length", or "stop" when it is `eos`); returns the outputs up to the finished one."""
    text = TextProcessor(tok)
    prompt = tok.encode(PROMPT_TEXT, add_special_tokens=False)
    text.add("r", prompt, SamplingParams(max_tokens=len(completion_ids), **params))
    outs = []
    for n, token in enumerate(completion_ids, 1):
        last = n == len(completion_ids)
        reason = (FinishReason.STOP if token == eos else FinishReason.LENGTH) if last else None
        out = RequestOutput("r", [token], finished=last, finish_reason=reason, num_prompt_tokens=len(prompt),
                            num_output_tokens=n)
        newly = text.process(out)
        assert newly == (out.finished and not last)
        outs.append(out)
        if out.finished:
            break
    return outs


def ids_and_boundaries(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The completion's token ids and where each token's text ends in COMPLETION."""
    ids = tok.encode(COMPLETION, add_special_tokens=False)
    ends = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]
    assert tok.decode(ids) == COMPLETION
    return ids, ends


def test_without_stop_strings_the_deltas_are_the_whole_decode(tok):
    ids, _ = ids_and_boundaries(tok)
    outs = run(tok, ids)
    assert "".join(o.text for o in outs) == COMPLETION
    assert all(o.text for o in outs[:3])  # nothing held back without stop strings
    assert outs[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_spanning_tokens_ends_the_request_at_the_token_completing_it(tok, include):
    ids, ends = ids_and_boundaries(tok)
    k = next(i for i in range(4, len(ids)) if ends[i] - ends[i - 1] >= 2 and ends[i + 1] - ends[i] >= 2)
    stop = COMPLETION[ends[k] - 2: ends[k] + 2]  # the last 2 characters of token k, the first 2 of token k+1
    assert COMPLETION.index(stop) == ends[k] - 2  # its first occurrence
    outs = run(tok, ids, stop=(stop,), include_stop_str_in_output=include)
    cut = ends[k] - 2 + (len(stop) if include else 0)
    assert "".join(o.text for o in outs) == COMPLETION[:cut]
    assert len(outs) == k + 2 and outs[-1].finish_reason is FinishReason.STOP
    assert outs[-1].num_output_tokens == k + 2  # tokens up to and including the one that completed it


def test_of_several_stop_strings_the_earliest_in_the_text_wins(tok):
    ids, _ = ids_and_boundaries(tok)
    late, early = "hello", "lazy"
    outs = run(tok, ids, stop=(late, early))
    assert "".join(o.text for o in outs) == COMPLETION[: COMPLETION.index(early)]


def test_a_possible_stop_prefix_is_held_back_and_flushed_at_the_end(tok):
    ids, _ = ids_and_boundaries(tok)
    eos = 1
    outs = run(tok, [*ids, eos], eos=eos, stop=("dog!!",))  # "dog" comes, "dog!!" never does
    sent = ""
    for n, o in enumerate(outs[:-1], 1):  # the last 4 characters wait: they may begin "dog!!"
        sent += o.text
        assert len(sent) == max(0, len(tok.decode(ids[:n])) - 4)
    assert "".join(o.text for o in outs) == COMPLETION  # the EOS itself is no text
    assert outs[-1].finish_reason is FinishReason.STOP


def test_several_tokens_in_one_output_are_cut_after_the_stop(tok):
    ids, ends = ids_and_boundaries(tok)
    text = TextProcessor(tok)
    text.add("r", tok.encode(PROMPT_TEXT, add_special_tokens=False), SamplingParams(stop=("lazy",)))
    lps = [TokenLogprobs(t, -0.5, []) for t in ids]
    out = RequestOutput("r", list(ids), logprobs=list(lps), num_output_tokens=len(ids))
    assert text.process(out)
    k = next(i for i, e in enumerate(ends) if e >= COMPLETION.index("lazy") + 4)
    assert out.token_ids == ids[: k + 1] and out.logprobs == lps[: k + 1] and out.num_output_tokens == k + 1
    assert out.text == COMPLETION[: COMPLETION.index("lazy")] and out.finish_reason is FinishReason.STOP


def test_a_character_split_across_tokens_comes_out_whole(tok):
    word = "日本語"
    ids = tok.encode(word, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # the premise: some token is part of a character
    outs = run(tok, ids)
    assert all("\ufffd" not in o.text for o in outs)
    assert "".join(o.text for o in outs) == word


def test_aborts_and_errors_pass_unchanged(tok):
    text = TextProcessor(tok)
    text.add("r", [5, 6], SamplingParams(stop=("xyz",)))
    out = RequestOutput("r", finished=True, finish_reason=FinishReason.ABORT)
    assert not text.process(out) and out.text == ""
    unknown = RequestOutput("nobody", [40], num_output_tokens=1)
    assert not text.process(unknown) and unknown.text == ""
