"""A real model whose logits go NaN for one input: the tiny random Llama with one token's
embedding row set to infinity. Any sequence that feeds that token (prompt or generated) gets NaN
hidden states (RMSNorm: inf * rsqrt(inf) = inf * 0) and so NaN logits from there on, in
transformers as in ours; sequences that never feed it are the plain model's.

`BAD_PROMPT`'s greedy first token under the plain model is the poisoned one, so a greedy request
for it gets one finite token (from the prefill) and NaN logits at its first decode."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

BAD_PROMPT = [124, 94, 308, 133, 67]


@dataclass(frozen=True)
class PoisonedModel:
    path: Path  # a model directory (weights + tokenizer)
    token: int  # the token id whose embedding is inf: BAD_PROMPT's greedy first token


def poisoned_copy(base_dir: Path, out_dir: Path) -> PoisonedModel:
    """A copy of `base_dir` (a tiny_llama_dir) with the embedding of BAD_PROMPT's greedy first
    token (transformers' choice on the plain model) set to +inf."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        token = int(model(torch.tensor([BAD_PROMPT])).logits[0, -1].argmax())
        assert token not in BAD_PROMPT, "the poisoned token must come from the model, not the prompt"
        model.get_input_embeddings().weight[token] = float("inf")
    model.save_pretrained(out_dir)
    for f in base_dir.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out_dir / f.name)
    return PoisonedModel(out_dir, token)
