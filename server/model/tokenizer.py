"""Tokenizer, chat template and streaming detokenization, from a model directory.

`tokenizers` does the encoding and incremental decoding (`DecodeStream`); the chat
template is rendered with jinja2 in a sandbox, the way transformers renders it.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from server.model.arch import UnsupportedModelError


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the model's chat template (an HTTP 400)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's text with it for
    training masks (TRL's assistant_only_loss); rendering it is rendering its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise UnsupportedModelError(f"{model_dir}: no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(tok_file))
        cfg = _read_json(model_dir / "tokenizer_config.json")
        # As transformers: special_tokens_map.json wins for a config saved before added_tokens_decoder
        # (older checkpoints keep them only there); a current config is read alone.
        legacy = "added_tokens_decoder" not in cfg
        specials = {**cfg, **_read_json(model_dir / "special_tokens_map.json")} if legacy else cfg
        self.bos_token = _token_text(specials.get("bos_token"))
        self.eos_token = _token_text(specials.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        # _template_error: why there is a template but no usable one (chat fails, the rest serves)
        self.chat_template, self._template_error = _load_chat_template(model_dir, cfg)
        self._template = None
        if self.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                self._template_error = f"this model's chat template does not parse: {exc}"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not), so a long prompt tokenized on a
        # worker thread does not stall the event loop.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def max_chars(self, num_tokens: int) -> int:
        """An upper bound on the characters `num_tokens` tokens can encode: a longer text
        cannot fit, so it is refused without tokenizing it (a cheap first check)."""
        return num_tokens * self._max_token_chars

    @cached_property
    def _max_token_chars(self) -> int:
        # A vocab entry's string is at least as long as the text its token stands for (byte-level
        # BPE: one char per byte; SentencePiece: the piece itself); x2 covers normalizers that
        # shorten the input before the model sees it (NFC, stripping).
        return 2 * max(len(piece) for piece in self._tok.get_vocab(with_added_tokens=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for logprobs' `token` fields)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (logprobs' `bytes` fields): exact also for a token that
        holds part of a multi-byte character, whose text alone decodes to U+FFFD."""
        piece = self._tok.id_to_token(token_id)
        if piece is None or token_id in self._added_ids or self._piece_bytes is None:
            return self.token_text(token_id).encode()
        try:
            return self._piece_bytes(piece)
        except (KeyError, ValueError):  # a piece outside the scheme: its decoded text
            return self.token_text(token_id).encode()

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._tok.get_added_tokens_decoder())

    @cached_property
    def _piece_bytes(self) -> Callable[[str], bytes] | None:
        """A vocabulary piece -> its bytes, by the decoder's scheme: byte-level BPE (GPT-2's
        byte-to-character table) or SentencePiece with byte fallback (`<0xNN>` pieces, U+2581 for
        spaces); None for any other (the decoded text is the best there is)."""
        state = json.loads(self._tok.decoder.__getstate__()) if self._tok.decoder is not None else {}
        kinds = {d.get("type") for d in state.get("decoders", [state])}
        if "ByteLevel" in kinds:
            table = {c: b for b, c in _bytes_to_chars().items()}
            return lambda piece: bytes(table[c] for c in piece)
        if "ByteFallback" in kinds:
            return lambda piece: (bytes([int(piece[3:5], 16)]) if len(piece) == 6 and piece.startswith("<0x")
                                  else piece.replace("\u2581", " ").encode())
        return None

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> str:
        if self._template is None:
            raise ChatTemplateError(self._template_error or "this model has no chat template; use /v1/completions")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def stream(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> DecodeStream:
        """A fresh incremental decoder primed with the prompt's last tokens (so the first
        output token's leading space / merged bytes decode as they would in context). A tail that
        ends inside a multi-byte character is cut before it: primed with an incomplete character,
        DecodeStream keeps no prefix and would emit the whole primed text as the first output."""
        tail = list(prompt_ids[-8:])
        while tail and self._tok.decode(tail, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            tail.pop()
        return DecodeStream(ids=tail, skip_special_tokens=skip_special_tokens)


def _bytes_to_chars() -> dict[int, str]:
    """Byte-level BPE's alphabet: each byte as the printable character its pieces spell it with
    (printable Latin-1 bytes stand for themselves, the rest take code points from 256 up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older configs write AddedToken dicts
        return value.get("content")
    return value


def _load_chat_template(model_dir: Path, cfg: dict) -> tuple[str | None, str | None]:
    """The chat template, or None and why (named templates, none of them "default": as transformers,
    no guess among templates meant for tools, RAG, ...)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(), None
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        if "default" not in named:
            return None, (f"this model has named chat templates ({', '.join(map(str, named))}) and none is "
                          f"'default'; use /v1/completions")
        template = named["default"]
    return template, None
