"""The systems gpu_check.py's decode benchmark compares, built lazily over one set of random
weights (each build timed into `Bench.setup`), and one runner per benchmark row."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loadtest import gpu_bench as gb
from server.model.arch import ModelArch
from server.model.random_weights import random_weights

if TYPE_CHECKING:
    from loadtest.gpu_check import Plan


@dataclass(frozen=True)
class Unit:
    """One benchmark row: `system` decoding `streams` sequences over `adapters` distinct adapters
    (0: base model only)."""

    system: str  # loramux | loramux --no-lora | loramux --enforce-eager | transformers | peft
    adapters: int
    streams: int


@dataclass
class Bench:
    """Everything the benchmark units share; built lazily, each step timed into `setup`."""

    plan: Plan
    work: Path
    setup: dict[str, float] = field(default_factory=dict)
    objects: dict = field(default_factory=dict)

    def timed(self, what: str, make):
        if what not in self.objects:
            t0 = time.perf_counter()
            self.objects[what] = make()
            if self.plan.device == "cuda":
                torch.cuda.synchronize()
            self.setup[what] = round(time.perf_counter() - t0, 2)
        return self.objects[what]

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)

    @property
    def max_len(self) -> int:
        return self.plan.prompt_len + self.plan.new_tokens + 16

    def model_dir(self) -> Path:
        return self.timed("model directory (config + tokenizer)",
                          lambda: gb.write_model_dir(self.work / "model", self.plan.hf_config))

    def arch(self) -> ModelArch:
        return ModelArch.from_dir(self.model_dir())

    def weights(self):
        dtype = torch.bfloat16 if self.plan.dtype == "bfloat16" else torch.float32
        return self.timed("random weights on the device", lambda: random_weights(self.arch(), dtype, self.device))

    def adapter_dirs(self) -> dict[str, Path]:
        dtype = self.weights().embed.dtype
        return self.timed(f"{max(self.plan.adapter_counts)} PEFT adapter directories (rank {gb.LORA_RANK}, written)",
                          lambda: gb.write_adapters(self.work / "adapters", self.arch(),
                                                    max(self.plan.adapter_counts), dtype, self.device))

    def engine(self, lora: bool, eager: bool = False):
        """loramux over the shared weights; CUDA graphs for decode unless `eager` (--enforce-eager)."""
        def make():
            return gb.make_engine(self.model_dir(), self.weights(), lora=lora,
                                  adapters=self.adapter_dirs() if lora else {}, max_seqs=max(self.plan.streams),
                                  max_len=self.max_len, device=self.plan.device, dtype=self.plan.dtype,
                                  enforce_eager=eager)
        name = "engine, LoRA enabled" if lora else "engine, --no-lora"
        return self.timed(name + (", --enforce-eager" if eager else ""), make)

    def hf(self):
        return self.timed("transformers model (views of the same weights)",
                          lambda: gb.hf_model_over(self.weights(), self.plan.hf_config))

    def peft(self, n: int, seconds_left: float):
        """PEFT over the transformers model with the first `n` adapters; SkipUnit if loading the
        missing ones would, at the rate of the first load, take longer than `seconds_left`."""
        names = list(self.adapter_dirs())[:n]
        have = self.objects.get("peft adapters", [])
        todo = {a: self.adapter_dirs()[a] for a in names if a not in have}
        if todo:
            rate = self.objects.get("peft s/adapter")
            if rate is not None and rate * len(todo) > seconds_left:
                raise SkipUnit(f"skipped: loading {len(todo)} more PEFT adapters would take ~{rate * len(todo):.0f} s")
            model = self.hf()
            t0 = time.perf_counter()
            self.objects["peft"] = gb.load_peft(model, todo, self.objects.get("peft"))
            self.objects["peft adapters"] = have + list(todo)
            seconds = time.perf_counter() - t0
            self.objects["peft s/adapter"] = seconds / len(todo)
            self.setup[f"PEFT: load {len(todo)} adapters"] = round(seconds, 2)
        return self.objects["peft"]

    def runner(self, unit: Unit, seconds_left: float = float("inf")):
        """-> run(new_tokens) -> seconds."""
        prompts = gb.random_prompts(unit.streams, self.plan.prompt_len, self.plan.hf_config["vocab_size"],
                                    seed=unit.streams)
        names = list(self.adapter_dirs())[:unit.adapters] if unit.adapters else []
        rows = [names[i % len(names)] for i in range(unit.streams)] if names else [None] * unit.streams
        if unit.system.startswith("loramux"):
            engine = self.engine(lora=unit.system != "loramux --no-lora",
                                 eager=unit.system.endswith("--enforce-eager"))
            run = lambda n: gb.engine_time(engine, prompts, rows, n)  # noqa: E731
        elif unit.system == "transformers":
            model = self.hf()
            if "peft" in self.objects:  # PEFT wrapped the same modules: run them bare
                base = self.objects["peft"]
                run = lambda n: _without_adapters(base, lambda: gb.hf_time(model, prompts, n))  # noqa: E731
            else:
                run = lambda n: gb.hf_time(model, prompts, n)  # noqa: E731
        else:
            model = self.peft(unit.adapters, seconds_left)
            run = lambda n: gb.hf_time(model, prompts, n, adapter_names=rows)  # noqa: E731
        return run


class SkipUnit(Exception):
    """This benchmark row would not fit in the time left; the message says why."""


def _without_adapters(peft_model, fn):
    with peft_model.disable_adapter():
        return fn()
