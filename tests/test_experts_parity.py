"""Expert libraries (issue 12) against PEFT: every kind of request in ONE concurrent batch (base,
one adapter, weighted mixtures of adapters of different ranks and target sets, Arrow routes, DoRA)
gives, for each request, the greedy tokens and logprobs PEFT gives running that request alone:
`add_weighted_adapter(..., "cat")` for mixtures, `create_arrow_model` for routes over experts of
one rank and target set (by-hand Arrow, tests/peft_experts.ArrowRef, for the others), `use_dora`
for DoRA. Tiny random Llama and Qwen2 (qkv biases: DoRA's rescale must spare the bias), the
default model, and a real server. fp32 throughout; tolerances as tests/test_lora_engine.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from tokenizers import Tokenizer

from kernels.row_plan import RowPlan
from server.engine.request import Mixture, Route

from experts_runs import experts_engine, run_batch, run_triton_child, to_json, warm
from peft_experts import Arrow, ArrowRef, Mix, make_expert, reference_greedy
from server_process import ServerProcess

NEW = 12
TINY_ABS = 2e-4
DEFAULT_ABS = 1e-3

# name -> make_expert kwargs. m-*: mixture / by-hand route experts (ranks and targets differ);
# x*: PEFT-Arrow experts (one rank, one target set); d-*: DoRA.
SPECS = {
    "single": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
    "m-r4-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], std=0.15),
    "m-r16-mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "m-r8-all": dict(r=8, lora_alpha=16),
    "x1": dict(r=8, lora_alpha=16),
    "x2": dict(r=8, lora_alpha=8),
    "x3": dict(r=8, lora_alpha=32),
    "d-all": dict(r=8, lora_alpha=16, use_dora=True),
    "d-some": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "v_proj", "down_proj"]),
}
MIXED = ("m-r4-qv", "m-r16-mlp", "m-r8-all")
SAME = ("x1", "x2", "x3")


def cases(dirs: dict[str, Path]) -> list[tuple[str, object, object]]:
    """(label, our choice, PEFT reference job) of every request of the batch."""
    p = dirs.__getitem__
    return [
        ("base", None, None),
        ("single", "single", p("single")),
        ("mix-2", Mixture(MIXED[:2], (0.7, 1.3)), Mix((p("m-r4-qv"), p("m-r16-mlp")), (0.7, 1.3))),
        ("mix-3-negative", Mixture(MIXED, (1.0, -0.8, 0.5)),
         Mix(tuple(map(p, MIXED)), (1.0, -0.8, 0.5))),
        ("arrow-top2", Route(SAME, 2, 1.0), Arrow(tuple(map(p, SAME)), top_k=2)),
        ("arrow-top1", Route(SAME, 1, 1.0), Arrow(tuple(map(p, SAME)), top_k=1)),
        ("arrow-top3-cold", Route(SAME, 3, 0.2), Arrow(tuple(map(p, SAME)), top_k=3, temperature=0.2)),
        ("arrow-top2-hot", Route(SAME, 2, 3.0), Arrow(tuple(map(p, SAME)), top_k=2, temperature=3.0)),
        ("arrow-mixed-targets", Route(MIXED, 2, 1.0), ArrowRef(tuple(map(p, MIXED)), top_k=2)),
        ("arrow-mixed-targets-cold", Route(MIXED, 3, 0.25), ArrowRef(tuple(map(p, MIXED)), top_k=3, temperature=0.25)),
        ("dora-all", "d-all", p("d-all")),
        ("dora-some", "d-some", p("d-some")),
    ]


def prompts_for(n: int, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(k),), generator=g).tolist()
            for k in torch.randint(4, 24, (n,), generator=g)]


def references(base_dir: Path, jobs: list[tuple[object, list[int]]], new: int):
    """PEFT's (tokens, logprobs) for each (reference job, prompt), each alone."""
    return [reference_greedy(base_dir, job, [prompt], new)[0] for job, prompt in jobs]


def differs(got, want, tol: float) -> bool:
    return got[0] != want[0] or max(abs(a - b) for a, b in zip(got[1], want[1])) > 10 * tol


def assert_parity(labels, tokens, logprobs, expected, tol: float) -> None:
    for label, got_t, got_l, (want_t, want_l) in zip(labels, tokens, logprobs, expected, strict=True):
        assert got_t == want_t, label
        assert got_l == pytest.approx(want_l, abs=tol), label


def assert_one_batch(steps: list[frozenset[str]], n: int, new: int) -> None:
    """Every request got each of its tokens in the same steps as every other: one batch."""
    assert steps == [frozenset(f"r{i}" for i in range(n))] * new


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """PEFT's references (DoRA above all) burn several times the CPU with two threads on a shared
    machine; one thread here, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ tiny random models

_tiny_cases: dict[str, tuple] = {}  # family -> tiny's value: the server test reuses Llama's


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    """(model dir, adapter dirs, batch cases, prompts, PEFT references) of one tiny family."""
    return tiny_case(request.param, request.getfixturevalue(f"tiny_{request.param}_dir"), tmp_path_factory)


def tiny_case(family: str, base_dir: Path, tmp_path_factory):
    if family not in _tiny_cases:
        root = tmp_path_factory.mktemp(f"experts-{family}")
        dirs = {n: make_expert(base_dir, root / n, seed=10 + i, **kw) for i, (n, kw) in enumerate(SPECS.items())}
        batch = cases(dirs)
        prompts = prompts_for(len(batch), seed=3, vocab=320)
        expected = references(base_dir, [(job, pr) for (_, _, job), pr in zip(batch, prompts)], NEW)
        _tiny_cases[family] = base_dir, dirs, batch, prompts, expected
    return _tiny_cases[family]


@pytest.fixture(params=["rows", "dense"])
def routing_path(request, monkeypatch) -> tuple[bool, list[bool]]:
    """Force how the step's routed tokens run (kernels/row_plan.py: as LoRA rows, or dense over the
    step's routing experts; the engine picks by library overlap): (dense forced, each step's path)."""
    taken: list[bool] = []
    build = RowPlan.build

    def forced(self, device, dense_slack=None):
        rows = build(self, device, dense_slack=0.0 if request.param == "rows" else float("inf"))
        if self._routes:
            taken.append(rows.dense is not None)
        return rows

    monkeypatch.setattr(RowPlan, "build", forced)
    return request.param == "dense", taken


def test_one_batch_of_every_kind_equals_peft_each_alone(tiny, routing_path):
    base_dir, dirs, batch, prompts, expected = tiny
    engine = experts_engine(base_dir, dirs)
    warm(engine, list(dirs))
    tokens, logprobs, steps = run_batch(engine, [(choice, pr) for (_, choice, _), pr in zip(batch, prompts)], NEW)
    assert_one_batch(steps, len(batch), NEW)
    dense, taken = routing_path
    assert len(taken) == NEW and set(taken) == {dense}  # every step took the forced path
    assert_parity([label for label, _, _ in batch], tokens, logprobs, expected, TINY_ABS)


def test_every_request_of_the_batch_changes_the_base_output(tiny):
    """The parity has teeth: on its prompt each non-base reference differs from the base model."""
    base_dir, _, batch, prompts, expected = tiny
    base = reference_greedy(base_dir, None, prompts, NEW)
    for (label, choice, _), want, plain in zip(batch, expected, base):
        if choice is not None:
            assert differs(want, plain, TINY_ABS), label


@pytest.mark.parametrize("page_rank", [None, 4])
def test_triton_lora_backend_under_the_interpreter(tiny_llama_dir, tmp_path_factory, page_rank):
    """The Triton shrink/expand kernels on a mixture's, routes' (LoRA rows) and DoRA's rows,
    through the whole engine, in a child under TRITON_INTERPRET (it must be set before triton is
    first imported, and must not leak into other tests); first tokens only: the interpreter is slow.
    page_rank 4: the pool in rank-unit pages (ranks 4, 8, 16 take 1, 2, 4 pages), read by the
    kernels and by the dense mixture / routing paths through the page table."""
    pytest.importorskip("triton")
    base_dir, dirs, batch, prompts, expected = tiny_case("llama", tiny_llama_dir, tmp_path_factory)
    # two routes over different libraries: the step routes them as LoRA rows (Triton's kernels)
    keep = ("base", "single", "mix-3-negative", "arrow-top2", "arrow-mixed-targets", "dora-some")
    picked = [i for i, (label, _, _) in enumerate(batch) if label in keep]
    new = 3
    names = {"single", *MIXED, *SAME, "d-some"}
    payload = {"model": str(base_dir), "adapters": {n: str(p) for n, p in dirs.items() if n in names},
               "jobs": [(to_json(batch[i][1]), prompts[i]) for i in picked], "new": new,
               "lora": {"lora_page_rank": page_rank}}
    got = run_triton_child(payload, timeout=300)
    assert got["lora"] == "triton" and got["page_rank"] == (page_rank or 16)
    assert_parity([batch[i][0] for i in picked], got["tokens"], got["logprobs"],
                  [(expected[i][0][:new], expected[i][1][:new]) for i in picked], TINY_ABS)


# ------------------------------------------------------------------------------ the default model

DEFAULT_SPECS = {
    "m-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "m-mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "x1": dict(r=8, lora_alpha=16),
    "x2": dict(r=8, lora_alpha=8),
    "x3": dict(r=8, lora_alpha=32),
    "d-all": dict(r=8, lora_alpha=16, use_dora=True),
}


@pytest.mark.slow
def test_default_model_mixture_route_and_dora_in_one_batch_equal_peft(default_model_dir, tmp_path):
    dirs = {n: make_expert(default_model_dir, tmp_path / n, seed=30 + i, std=0.02, **kw)
            for i, (n, kw) in enumerate(DEFAULT_SPECS.items())}
    p = dirs.__getitem__
    batch = [
        ("base", None, None),
        ("mix-2-negative", Mixture(("m-qv", "m-mlp"), (0.8, -0.6)), Mix((p("m-qv"), p("m-mlp")), (0.8, -0.6))),
        ("arrow-top2", Route(SAME, 2, 0.5), Arrow(tuple(map(p, SAME)), top_k=2, temperature=0.5)),
        ("dora-all", "d-all", p("d-all")),
    ]
    engine = experts_engine(default_model_dir, dirs, kv_cache_memory=256 << 20)
    tok = engine.tokenizer
    questions = ["What is the capital of France?", "Name three colors.", "Why is the sky blue?",
                 "Write a haiku about tea."]
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in questions]
    new = 10
    base = reference_greedy(default_model_dir, None, prompts, new)  # the base model on every prompt (one load)
    expected = [base[0], *references(default_model_dir, [(job, pr) for (_, _, job), pr in zip(batch[1:], prompts[1:])],
                                     new)]
    warm(engine, list(dirs))
    tokens, logprobs, steps = run_batch(engine, [(choice, pr) for (_, choice, _), pr in zip(batch, prompts)], new)
    assert_one_batch(steps, len(batch), new)
    assert_parity([label for label, _, _ in batch], tokens, logprobs, expected, DEFAULT_ABS)
    for (label, _, _), want, plain in zip(batch[1:], expected[1:], base[1:]):
        assert differs(want, plain, DEFAULT_ABS), label


# ------------------------------------------------------------------------------ a real server

SERVED = "tiny"


def wire(choice) -> dict:
    """The request fields that ask for `choice` (model = the base unless one adapter)."""
    if choice is None:
        return {"model": SERVED}
    if isinstance(choice, str):
        return {"model": choice}
    if isinstance(choice, Mixture):
        return {"model": SERVED, "adapters": [{"id": a, "weight": w} for a, w in zip(choice.adapters, choice.weights)]}
    route = {"top_k": choice.top_k, "temperature": choice.temperature}
    return {"model": SERVED, "route": route if not choice.adapters else {**route, "experts": list(choice.adapters)}}


def test_real_server_concurrent_requests_of_every_kind_equal_peft(tiny_llama_dir, tmp_path_factory):
    """Over HTTP, sent at once from threads: base, one adapter, mixtures, routes (named experts,
    and experts omitted = every adapter the caller may use: here exactly the served non-DoRA
    ones) and DoRA; each completion's tokens and logprobs are PEFT's for it alone."""
    base_dir, dirs, batch, prompts, expected = tiny_case("llama", tiny_llama_dir, tmp_path_factory)
    library = [n for n, kw in SPECS.items() if not kw.get("use_dora")]
    omitted = Route((), 3, 0.5)
    omitted_prompt = prompts_for(len(batch) + 1, seed=4, vocab=320)[-1]
    batch = [*batch, ("route-experts-omitted", omitted, None)]
    prompts = [*prompts, omitted_prompt]
    expected = [*expected, *references(base_dir, [(ArrowRef(tuple(dirs[n] for n in library), 3, 0.5),
                                                   omitted_prompt)], NEW)]
    work = tmp_path_factory.mktemp("server")
    (work / "empty-store").mkdir()
    srv = ServerProcess(["--model", str(base_dir), "--served-model-name", SERVED, "--dtype", "float32",
                         "--kv-cache-memory", "16MiB", "--num-threads", "1", "--max-lora-rank", "16",
                         "--adapters-dir", str(work / "empty-store"),
                         "--lora-modules", *(f"{n}={p}" for n, p in dirs.items())], work / "server.log")
    try:
        listed = httpx.get(srv.base_url + "/v1/models", timeout=30).json()["data"]
        assert {m["id"] for m in listed} == {SERVED, *dirs}

        def ask(i: int) -> dict:
            body = {**wire(batch[i][1]), "prompt": prompts[i], "max_tokens": NEW, "temperature": 0,
                    "logprobs": 0, "ignore_eos": True}
            r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, (batch[i][0], r.text)
            return r.json()["choices"][0]

        with ThreadPoolExecutor(len(batch)) as pool:
            choices = list(pool.map(ask, range(len(batch))))
    finally:
        srv.stop()
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    for (label, _, _), choice, (want_t, want_l) in zip(batch, choices, expected, strict=True):
        assert choice["logprobs"]["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in want_t], label
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(want_l, abs=TINY_ABS), label
