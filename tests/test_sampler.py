"""Penalties (server/engine/sampler.py): the repetition penalty as transformers applies it, over
prompt and output tokens, and OpenAI's frequency and presence penalties over output tokens, on
the engine's greedy decoding; and a sequence whose last token is still on the device (async
scheduling) is penalised as if the host had it."""

from __future__ import annotations

import pytest
import torch

from server.engine.model_runner import Pending
from server.engine.request import GenerationRequest, InvalidRequestError, SamplingParams, Sequence
from server.engine.sampler import Sampler, _top_p

from engine_runs import cpu_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def greedy_run(engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", p, params))
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    return [got[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_repetition_penalty_greedy_equals_transformers(tiny_llama_dir, async_scheduling):
    import transformers

    g = torch.Generator().manual_seed(31)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in (5, 12, 3)]
    new = 16
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    expected, plain = [], []
    for p in prompts:
        for penalty, into in ((1.8, expected), (1.0, plain)):
            out = model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)
            into.append(out[0, len(p):].tolist())
    assert expected != plain  # the penalty changes the answer: not applying it would show
    engine = cpu_engine(tiny_llama_dir, async_scheduling=async_scheduling)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, repetition_penalty=1.8)
    assert greedy_run(engine, prompts, params) == expected


def seq_with(prompt: list[int], output: list[int], **params) -> Sequence:
    s = Sequence.from_request(GenerationRequest("s", prompt, SamplingParams(**params)))
    s.token_ids += output
    return s


def test_frequency_and_presence_penalties_follow_openais_formula():
    """logit[t] - count[t] * frequency_penalty - (count[t] > 0) * presence_penalty, counts over
    the output tokens only (OpenAI's API reference); a prompt token is not penalised."""
    V = 8
    logits = torch.linspace(-1.0, 2.0, V)[None, :].repeat(2, 1)
    seqs = [seq_with([1, 1, 6], [2, 3, 3, 3], temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25),
            seq_with([2], [4], temperature=0.0)]
    out = logits.clone()
    Sampler(torch.device("cpu"))._apply_penalties(out, seqs, None)
    want = logits.clone()
    want[0, 2] -= 1 * 0.5 + 0.25
    want[0, 3] -= 3 * 0.5 + 0.25
    assert torch.equal(out, want)


def test_a_pending_last_token_is_penalised_as_if_on_the_host():
    """Async scheduling: a sequence's last sampled token is still on the device when the next
    step samples. Counting it there gives what counting it on the host gives."""
    V = 10
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, V, generator=g)
    kw = dict(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3)
    known = [seq_with([1, 2], [5, 7], **kw), seq_with([3], [], **kw), seq_with([4], [9, 9], **kw)]
    short = [seq_with([1, 2], [5], **kw), seq_with([3], [], **kw), seq_with([4], [9], **kw)]
    prev_tokens = torch.tensor([0, 9, 4, 7])  # the previous step's: rows 3 and 1 are the pending tokens
    pending = Pending(rows=[0, 2], sampled=[0, 2], srcs=[3, 1], tokens=prev_tokens)
    sampler = Sampler(torch.device("cpu"))
    want, got = logits.clone(), logits.clone()
    sampler._apply_penalties(want, known, None)
    sampler._apply_penalties(got, short, pending)
    assert torch.allclose(got, want) and not torch.allclose(got, logits)


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-6])
@pytest.mark.parametrize("extra", [{}, dict(top_p=0.9), dict(top_k=3), dict(min_p=0.1)], ids=str)
def test_a_tiny_positive_temperature_samples_the_top_token(temperature, extra):
    """temperature -> 0 is greedy. A positive temperature the validator accepts (a JSON 1e-39) made
    logits / temperature overflow to inf and the softmax NaN, and the NaN row picked token 0;
    vLLM samples a temperature under 1e-5 greedily, as here."""
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0], [0.5, -1.0, 2.5, 2.0]])
    seqs = [seq_with([1, 2], [], temperature=temperature, seed=s, **extra) for s in (0, 1)]
    tokens = Sampler(torch.device("cpu")).sample(logits, seqs).output().token_ids
    assert tokens == [1, 2]


def test_a_failed_step_leaves_seeded_neighbours_as_if_alone():
    """A row whose seed no generator takes fails the step (the engine then reruns the others
    without it). The seeded rows before it had already drawn their noise, so on the rerun they
    drew again: their tokens depended on who shared the failed batch."""
    from dataclasses import replace

    logits = torch.zeros(1, 1000)  # flat: every draw of the noise picks another token
    alone = Sampler(torch.device("cpu")).sample(logits, [seq_with([1], [], seed=5)]).output().token_ids
    seeded, poison = seq_with([1], [], seed=5), seq_with([2], [], seed=1)
    poison.request.params = replace(poison.params, seed=2**64)  # past validation, as test_engine's poison
    sampler = Sampler(torch.device("cpu"))
    with pytest.raises(ValueError):
        sampler.sample(logits.repeat(2, 1), [seeded, poison])
    assert sampler.sample(logits, [seeded]).output().token_ids == alone


def test_logprobs_are_the_models_before_penalties_and_temperature():
    """vLLM's default (logprobs_mode raw_logprobs): the log-softmax of the model's logits, whatever
    temperature, top-k/p and penalties then do to the draw; the sampled token's and the top ones'."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 12, generator=g) * 3
    seqs = [seq_with([4, 4], [4, 7], temperature=0.4, top_k=3, repetition_penalty=2.0, frequency_penalty=1.0,
                     logprobs=3, seed=1),
            seq_with([1], [], temperature=0.0, presence_penalty=2.0, logprobs=0)]
    out = Sampler(torch.device("cpu")).sample(logits, seqs).output()
    raw = torch.log_softmax(logits, dim=-1)
    for row, lp in enumerate(out.logprobs):
        assert lp.logprob == pytest.approx(raw[row, out.token_ids[row]].item())
        k = seqs[row].params.logprobs
        assert [t for t, _ in lp.top] == raw[row].topk(k).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(raw[row].topk(k).values.tolist())


@pytest.mark.parametrize("penalty", [5e-324, 1e-40, 0.001])
def test_a_repetition_penalty_too_small_to_divide_by_is_refused(penalty):
    """Found by the API fuzzer once NaN scores became an error: 5e-324 passed `> 0` but is 0 in
    float32, so a repeated token's positive logit became inf and the request a 500."""
    with pytest.raises(InvalidRequestError) as refused:
        SamplingParams(repetition_penalty=penalty).validate()
    assert refused.value.param == "repetition_penalty"
    SamplingParams(repetition_penalty=0.01).validate()


def test_a_top_p_below_float32s_range_keeps_the_top_token():
    """Found by the API fuzzer: top_p 5e-324 is valid (> 0) but 0 in float32, and the top token's
    mass before it (0) was >= 0, so every token was dropped and the request failed as NaN."""
    logits = torch.tensor([[0.5, 3.0, 1.0], [2.0, -1.0, 0.0]])
    kept = _top_p(logits, [5e-324, 1e-40])
    assert torch.equal(kept.isfinite(), torch.tensor([[False, True, False], [True, False, False]]))
