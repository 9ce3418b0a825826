"""Side-by-side check of the demo adapters with transformers + PEFT (the reference, not loramux).

    python adapters_store/recipes/check_demo_adapters.py [--store adapters_store] [--max-new-tokens 48]

For each prompt, greedy generation from the base model and from each adapter, with
the chat template's default system prompt (what a plain inference request gets).
Each answer is checked for its style: french mostly French words, json parseable
by `json.loads` as an object, pirate containing pirate words; the base answer must
show none of the three styles. Some prompts are held out: the script asserts they
are not in the training tables. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))

import demo_data  # noqa: E402

TRAINED_PROMPTS = ["What is the capital of France?", "Name three colors.", "What is 2 plus 2?"]
HELD_OUT_PROMPTS = ["How do birds fly?", "Give me a tip for staying healthy.",
                    "How does a refrigerator work?", "Why do we need to sleep?"]

# Function words, which any sentence has: enough to tell French from English text.
# Words common to both languages ("a", "on", "en", "plus", "me", "as") are left out.
FRENCH_WORDS = set("""le la les l un une des du de d et est sont il elle ils elles nous vous je j tu ce cette
ces c qui que qu dans pour avec sur pas ne n par au aux son sa ses leur leurs mais ou où très bien aussi
comme être avoir fait font voici y se s ont était sont peut tout tous toutes plusieurs quand leurs""".split())
ENGLISH_WORDS = set("""the an and is are of to in it that for with this was be by at from you your they their
have has not but what which can will there these those its or were been do does how why when who""".split())
PIRATE_WORDS = {"arr", "matey", "mateys", "ahoy", "ye", "yer", "aye", "hearty", "avast", "shiver", "timbers",
                "savvy", "yo", "ho", "landlubber", "scallywags", "doubloons", "grog", "o'", "an'", "blimey"}


def words(text: str) -> list[str]:
    """Lowercase words; apostrophe prefixes split off (l'eau -> l, eau) but o' / an' kept."""
    return re.findall(r"[a-zà-ÿœæ]+'?(?![a-zà-ÿ])|[a-zà-ÿœæ]+", text.lower())


def french_share(text: str) -> tuple[float, int, int]:
    """(share of French among French+English function words, #French, #English)."""
    ws = [w.rstrip("'") for w in words(text)]
    fr = sum(w in FRENCH_WORDS for w in ws)
    en = sum(w in ENGLISH_WORDS for w in ws)
    return (fr / (fr + en) if fr + en else 0.0), fr, en


def parses_as_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text.strip()), dict)
    except ValueError:
        return False


def pirate_hits(text: str) -> list[str]:
    return sorted({w for w in words(text) if w in PIRATE_WORDS})


def verdict(style: str, text: str) -> tuple[bool, str]:
    """(passed, short reason) for an answer that should be in `style` ("base": in none)."""
    share, fr, en = french_share(text)
    if style == "french":
        return share >= 0.75 and fr >= 2, f"French {share:.0%} ({fr} fr / {en} en words)"
    if style == "json":
        ok = parses_as_object(text)
        return ok, "json.loads ok" if ok else "not a JSON object"
    if style == "pirate":
        hits = pirate_hits(text)
        return bool(hits), f"pirate words {hits}" if hits else "no pirate words"
    styled = [s for s, hit in (("french", share >= 0.75 and fr >= 2), ("json", parses_as_object(text)),
                               ("pirate", bool(pirate_hits(text)))) if hit]
    return not styled, "plain" if not styled else f"looks like {styled}"


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(chat, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=HERE.parent)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    leaked = set(HELD_OUT_PROMPTS) & demo_data.all_questions()
    assert not leaked, f"held-out prompts found in the training tables: {leaked}"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model.default_model import ensure_default_model

    model_dir = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = None
    for style in demo_data.STYLES:
        path = str(args.store / style)
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=style).eval()
        else:
            model.load_adapter(path, adapter_name=style)

    failures, start = [], time.perf_counter()
    for prompt in TRAINED_PROMPTS + HELD_OUT_PROMPTS:
        tag = "held out" if prompt in HELD_OUT_PROMPTS else "in training"
        print(f"\n### {prompt}  ({tag})")
        for style in ("base",) + demo_data.STYLES:
            if style == "base":
                with model.disable_adapter():
                    text = generate(model, tokenizer, prompt, args.max_new_tokens)
            else:
                model.set_adapter(style)
                text = generate(model, tokenizer, prompt, args.max_new_tokens)
            ok, why = verdict(style, text)
            if not ok:
                failures.append((style, prompt))
            shown = text.replace("\n", "\\n")
            print(f"  {style:7s}| {shown}\n  {'':7s}  -> {'PASS' if ok else 'FAIL'}: {why}", flush=True)
    total = len(TRAINED_PROMPTS + HELD_OUT_PROMPTS) * (1 + len(demo_data.STYLES))
    print(f"\n{total - len(failures)}/{total} checks passed in {time.perf_counter() - start:.0f}s")
    for style, prompt in failures:
        print(f"  FAILED: {style} on {prompt!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
