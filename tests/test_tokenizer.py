"""server/model/tokenizer.py: incremental detokenization primed with a prompt that ends inside a
character (a token-id prompt can: byte-level BPE has tokens for lone UTF-8 lead bytes): the
completion's text must not repeat the prompt. tokenizers' DecodeStream keeps no prefix when the
primed text ends in U+FFFD, so its first step returned the whole primed tail (found by
tests/test_experts_parity.py's server test with random token-id prompts)."""

from __future__ import annotations

from conftest import byte_level_tokenizer
from server.model.tokenizer import Tokenizer


def test_a_prompt_ending_mid_character_does_not_leak_into_the_completion(tmp_path):
    byte_level_tokenizer(320).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    lead_byte = tok.encode("日", add_special_tokens=False)[:1]  # the first of its three bytes
    prompt = tok.encode("Hello there", add_special_tokens=False) + lead_byte
    assert tok.backend.decode(prompt).endswith("\ufffd")
    stream = tok.stream(prompt)
    pieces = [stream.step(tok.backend, t) for t in tok.encode(" world", add_special_tokens=False)]
    assert "".join(p for p in pieces if p) == " world"
