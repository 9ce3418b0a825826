"""Make PEFT LoRA adapters for tests with PEFT itself (random A and B so each one visibly
changes the model: PEFT zero-initializes B)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_peft_adapter(base_dir: Path, out_dir: Path, seed: int = 0, std: float = 0.3,
                      safe_serialization: bool = True, **lora_kwargs) -> Path:
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return out_dir


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], new: int):
    """Greedy tokens and the chosen tokens' logprobs from PEFT (or the bare model), batch 1."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    return greedy(model, prompt, new)


def greedy(model, prompt: list[int], new: int):
    """Greedy tokens and the chosen tokens' logprobs of a loaded (PEFT) model, batch 1."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
    return tokens, [logprobs[i, t].item() for i, t in enumerate(tokens)]
