"""server/model/tokenizer.py: incremental detokenization primed with a prompt that ends inside a
character (a token-id prompt can: byte-level BPE has tokens for lone UTF-8 lead bytes): the
completion's text must not repeat the prompt. tokenizers' DecodeStream keeps no prefix when the
primed text ends in U+FFFD, so its first step returned the whole primed tail (found by
tests/test_experts_parity.py's server test with random token-id prompts)."""

from __future__ import annotations

import json

import pytest

from conftest import byte_level_tokenizer
from server.model.tokenizer import ChatTemplateError, Tokenizer


def test_a_prompt_ending_mid_character_does_not_leak_into_the_completion(tmp_path):
    byte_level_tokenizer(320).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    lead_byte = tok.encode("日", add_special_tokens=False)[:1]  # the first of its three bytes
    prompt = tok.encode("Hello there", add_special_tokens=False) + lead_byte
    assert tok.backend.decode(prompt).endswith("\ufffd")
    stream = tok.stream(prompt)
    pieces = [stream.step(tok.backend, t) for t in tok.encode(" world", add_special_tokens=False)]
    assert "".join(p for p in pieces if p) == " world"


TEXT = "Hello wörld, 日本語のテキスト 🙂 Ça va?"


def test_token_bytes_are_the_bytes_each_token_stands_for_byte_level(default_model_dir):
    """Byte-level BPE (the default model): each piece through GPT-2's byte table as transformers
    has it, and a text's tokens' bytes concatenated are the text's UTF-8, though most of these
    tokens are parts of characters whose text alone is U+FFFD."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = Tokenizer(default_model_dir)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added = set(tok.backend.get_added_tokens_decoder())
    for token_id in range(tok.vocab_size):
        piece = tok.backend.id_to_token(token_id)
        expected = tok.token_text(token_id).encode() if token_id in added else bytes(byte_of[c] for c in piece)
        assert tok.token_bytes(token_id) == expected, (token_id, piece)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert any(tok.token_text(i).endswith("\ufffd") for i in ids)  # the case that matters
    assert b"".join(map(tok.token_bytes, ids)) == TEXT.encode()


def test_token_bytes_of_sentencepiece_with_byte_fallback(tmp_path):
    """SentencePiece-style pieces (U+2581 for a space, `<0xNN>` for bytes outside the vocabulary)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece in ("\u2581", "H", "e", "l", "o", "w", "r", "d", ",", "C", "a", "v", "?", "\u2581Hello", "\u2581va"):
        vocab.setdefault(piece, len(vocab))
    model = models.BPE(vocab=vocab, merges=[], byte_fallback=True)
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    ids = tok.encode("Hello wörld, 日本 Ça va?", add_special_tokens=False)
    assert any(tok.backend.id_to_token(i).startswith("<0x") for i in ids)
    assert b"".join(map(tok.token_bytes, ids)) == "Hello wörld, 日本 Ça va?".encode()


def _with_template(path, template: str):
    byte_level_tokenizer(320).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": template}))
    return path


MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"}]


def test_a_template_with_generation_blocks_renders_as_transformers_renders_it(tmp_path):
    """`{% generation %}` marks the assistant's text for training masks (TRL's assistant_only_loss);
    transformers renders its body. The tag made the sandbox fail to compile: the server did not start."""
    import transformers

    template = ("{% for m in messages %}<s>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}</s>\n{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    path = _with_template(tmp_path, template)
    want = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    assert Tokenizer(path).render_chat(MESSAGES, add_generation_prompt=True) == want


def test_a_template_that_does_not_parse_fails_chat_only(tmp_path):
    """As transformers (which compiles a template when it is applied): the model still serves
    completions; a chat request gets the template's syntax error (a 400), not a server that won't start."""
    tok = Tokenizer(_with_template(tmp_path, "{% for m in messages %}{{ m.content }"))
    assert tok.encode("Hello") == tok.backend.encode("Hello").ids
    with pytest.raises(ChatTemplateError, match="chat template does not parse: unexpected '}'"):
        tok.render_chat(MESSAGES)


@pytest.mark.parametrize("config, special_map", [
    ({}, {"bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False}, "eos_token": "</s>"}),
    ({"bos_token": None, "eos_token": "<s>"}, {"bos_token": "<s>", "eos_token": "</s>"}),
    # a config saved by transformers >= 4.34 (it lists added_tokens_decoder): the map is not read
    ({"added_tokens_decoder": {}, "bos_token": "</s>", "eos_token": "<s>"}, {"bos_token": "<s>", "eos_token": "</s>"}),
], ids=["only-in-the-map", "the-map-wins", "a-current-config-wins"])
def test_special_tokens_map_json_names_bos_and_eos_as_transformers_reads_it(tmp_path, config, special_map):
    """Checkpoints saved by older transformers keep bos/eos in special_tokens_map.json, which
    transformers reads over tokenizer_config.json: the template's `bos_token` rendered empty and
    the EOS fallback was missing."""
    import transformers

    byte_level_tokenizer(320).save(str(tmp_path / "tokenizer.json"))
    config = dict(config, chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}"
                                        "{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.render_chat(MESSAGES, add_generation_prompt=False) == hf.apply_chat_template(MESSAGES, tokenize=False)
    assert tok.eos_token_id == hf.eos_token_id


def test_named_templates_without_a_default_fail_chat_as_transformers_does(tmp_path):
    """transformers refuses to pick among named templates with no "default" (one may be for tools,
    one for RAG); the first of the list was used instead, silently."""
    named = [{"name": "tool_use", "template": "T{{ messages[0]['content'] }}"}, {"name": "rag", "template": "R"}]
    tok = Tokenizer(_with_template(tmp_path, named))
    with pytest.raises(ChatTemplateError, match="named chat templates \\(tool_use, rag\\) and none is 'default'"):
        tok.render_chat(MESSAGES)
