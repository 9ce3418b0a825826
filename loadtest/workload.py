"""A reproducible serving workload: who asks for what, when.

A workload is a list of `RequestSpec`s made from a `WorkloadConfig` and a seed; the same
config gives the same requests, byte for byte, on any machine (only `random.Random` is used),
so two runs against two server builds see identical traffic.

- Arrivals: a Poisson process at `rate` requests/s (exponential gaps), or every request at
  t=0 when `rate` is infinite; the runner's `max_concurrency` then turns the latter into a
  closed loop of N clients (the same two knobs as vLLM's benchmark_serving).
- Lengths: prompt and output lengths drawn from `LengthDist`s. Prompts are text made of
  common words, so the prompt length is in words (about one BPE token each on real
  vocabularies); the server's `usage` reports the true token counts. Outputs use
  `ignore_eos` by default so every request generates exactly `max_tokens` tokens and the
  load does not depend on what the model happens to say.
- Adapters: a share `base_share` of requests go to the base model; the rest pick an adapter
  with Zipf-like popularity, P(rank k) ~ 1 / (k + 1) ** zipf_s, rank 0 = the first name.
- Disconnects: a share `disconnect_share` of requests stream and close their connection
  after `disconnect_after` text chunks (a client that gives up mid-stream).
- Tenants: with `tenants` (name, traffic weight) each request belongs to one tenant, drawn
  by weight; the runner sends it with that tenant's API key (keys never enter a workload file).

    python -m loadtest.workload -n 200 --rate 4 --adapters a,b,c --out workload.jsonl
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_REQUESTS = 100_000  # a hard cap: a typo in -n must not become an unbounded run

# Common English words; prompts are random sequences of them (no tokenizer needed here).
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this have had are not but be "
    "or which one you were all we when there can an their what so if has more about up out them some "
    "would into time other than then now only its could two may first been any like over new just year "
    "people know take see come think look want give use find tell ask work seem feel try leave call good "
    "small large long great little own old right big high different next early young important few public "
    "bad same able water river city country world house school system number night point home family "
    "story question money month book word business issue side kind head service friend father power hour "
    "game line end member law car name president team minute idea body information back parent face "
    "level office door health person art war history party result change morning reason research girl "
    "guy moment air teacher force education foot boy age policy music market sense nation plan college"
).split()


@dataclass(frozen=True)
class LengthDist:
    """A length distribution over positive integers, written `fixed:N`, `uniform:LO:HI` or
    `lognormal:MEDIAN:SIGMA[:MAX]` (clipped to [1, MAX], MAX defaulting to 8 x MEDIAN)."""

    kind: str
    a: float
    b: float = 0.0
    cap: int = 0

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        parts = text.strip().split(":")
        try:
            kind, nums = parts[0].lower(), [float(x) for x in parts[1:]]
        except ValueError as exc:
            raise ValueError(f"bad length distribution {text!r}: {exc}") from exc
        if kind == "fixed" and len(nums) == 1 and nums[0] >= 1:
            return cls("fixed", nums[0])
        if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
            return cls("uniform", nums[0], nums[1])
        if kind == "lognormal" and len(nums) in (2, 3) and nums[0] >= 1 and nums[1] >= 0:
            cap = int(nums[2]) if len(nums) == 3 else int(8 * nums[0])
            return cls("lognormal", nums[0], nums[1], max(1, cap))
        raise ValueError(f"bad length distribution {text!r}: use fixed:N, uniform:LO:HI or "
                         "lognormal:MEDIAN:SIGMA[:MAX]")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, min(self.cap, round(rng.lognormvariate(math.log(self.a), self.b))))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"lognormal:{self.a:g}:{self.b:g}:{self.cap}"


@dataclass(frozen=True)
class RequestSpec:
    """One request of the workload. `adapter` None means the base model; `arrival_s` is the
    send time relative to the start of the run."""

    index: int
    arrival_s: float
    adapter: str | None
    prompt: str
    prompt_words: int
    max_tokens: int
    stream: bool = True
    api: str = "completions"  # completions | chat
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int | None = None
    disconnect_after: int | None = None  # close the stream after this many text chunks (None: read it all)
    tenant: str | None = None  # whose API key the runner sends it with (None: the default key, if any)

    def body(self, model: str) -> dict:
        """The OpenAI request body; `model` is the adapter name or the base model's id."""
        common = {"model": model, "max_tokens": self.max_tokens, "stream": self.stream,
                  "temperature": self.temperature, "ignore_eos": self.ignore_eos}
        if self.seed is not None:
            common["seed"] = self.seed
        if self.stream:
            common["stream_options"] = {"include_usage": True}  # true token counts in the last chunk
        if self.api == "chat":
            return {**common, "messages": [{"role": "user", "content": self.prompt}]}
        return {**common, "prompt": self.prompt}


@dataclass
class WorkloadConfig:
    num_requests: int = 100
    rate: float = math.inf  # requests/s (Poisson); inf: all at t=0
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist.parse("uniform:16:128"))
    output_len: LengthDist = field(default_factory=lambda: LengthDist.parse("uniform:16:64"))
    adapters: tuple[str, ...] = ()  # in popularity order (rank 0 most popular)
    zipf_s: float = 1.1
    base_share: float = 0.2  # of requests that go to the base model (all of them if no adapters)
    stream_share: float = 1.0
    api: str = "completions"
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    disconnect_share: float = 0.0  # of requests that stream and hang up mid-stream
    disconnect_after: LengthDist = field(default_factory=lambda: LengthDist.parse("fixed:2"))  # text chunks
    tenants: tuple[tuple[str, float], ...] = ()  # (name, traffic weight); () = no tenant

    def validate(self) -> None:
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise ValueError(f"num_requests must be in [1, {MAX_REQUESTS}]")
        if not self.rate > 0:
            raise ValueError("rate must be > 0 (inf: all requests at once)")
        if not all(0.0 <= x <= 1.0 for x in (self.base_share, self.stream_share, self.disconnect_share)):
            raise ValueError("base_share, stream_share and disconnect_share must be in [0, 1]")
        if self.zipf_s < 0:
            raise ValueError("zipf_s must be >= 0 (0: uniform over adapters)")
        if self.api not in ("completions", "chat"):
            raise ValueError("api must be 'completions' or 'chat'")
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError("adapter names must be distinct")
        if len({n for n, _ in self.tenants}) != len(self.tenants) or not all(w > 0 for _, w in self.tenants):
            raise ValueError("tenant names must be distinct and their traffic weights > 0")


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalized P(rank k) ~ 1 / (k + 1) ** s for k in [0, n)."""
    raw = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def generate(cfg: WorkloadConfig) -> list[RequestSpec]:
    """The workload for `cfg`: deterministic in `cfg` (seed included)."""
    cfg.validate()
    # Separate streams per aspect, so changing e.g. the length distribution does not
    # reshuffle the arrival times or the adapter picks of an otherwise identical workload.
    rngs = {name: random.Random(f"{cfg.seed}:{name}") for name in ("arrival", "adapter", "len", "text", "stream",
                                                                 "disconnect", "tenant")}
    tenant_cdf = list(itertools.accumulate(w for _, w in cfg.tenants))
    cumulative = list(itertools.accumulate(zipf_weights(len(cfg.adapters), cfg.zipf_s))) if cfg.adapters else []
    t = 0.0
    out = []
    for i in range(cfg.num_requests):
        if math.isfinite(cfg.rate) and i > 0:
            t += rngs["arrival"].expovariate(cfg.rate)
        adapter = None
        u = rngs["adapter"].random()
        if cfg.adapters and u >= cfg.base_share:
            # Reuse u (uniform in [base_share, 1)) rescaled to [0, 1) for the rank pick.
            v = (u - cfg.base_share) / (1.0 - cfg.base_share)
            adapter = cfg.adapters[min(bisect.bisect_right(cumulative, v), len(cfg.adapters) - 1)]
        words = cfg.prompt_len.sample(rngs["len"])
        max_tokens = cfg.output_len.sample(rngs["len"])
        # The index up front makes every prompt distinct, so no prefix cache can turn the
        # workload into a cache benchmark by accident.
        prompt = f"{i}: " + " ".join(rngs["text"].choice(_WORDS) for _ in range(max(0, words - 1)))
        stream = rngs["stream"].random() < cfg.stream_share
        disconnect_after = None
        if rngs["disconnect"].random() < cfg.disconnect_share:  # only a stream can be left mid-way
            stream, disconnect_after = True, cfg.disconnect_after.sample(rngs["disconnect"])
        tenant = None
        if cfg.tenants:  # its own stream: adding tenants leaves the rest of the workload as it was
            pick = bisect.bisect_right(tenant_cdf, rngs["tenant"].random() * tenant_cdf[-1])
            tenant = cfg.tenants[min(pick, len(cfg.tenants) - 1)][0]
        out.append(RequestSpec(index=i, arrival_s=round(t, 6), adapter=adapter, prompt=prompt, prompt_words=words,
                               max_tokens=max_tokens, stream=stream, api=cfg.api, ignore_eos=cfg.ignore_eos,
                               temperature=cfg.temperature, disconnect_after=disconnect_after, tenant=tenant))
    return out


def save(specs: list[RequestSpec], path: Path) -> None:
    """One JSON object per line."""
    with open(path, "w") as f:
        for s in specs:
            f.write(json.dumps(asdict(s)) + "\n")


def load(path: Path) -> list[RequestSpec]:
    specs = []
    with open(path) as f:
        for line in itertools.islice(f, MAX_REQUESTS + 1):
            if line.strip():
                specs.append(RequestSpec(**json.loads(line)))
    if len(specs) > MAX_REQUESTS:
        raise ValueError(f"{path}: more than {MAX_REQUESTS} requests")
    return specs


def describe(specs: list[RequestSpec]) -> str:
    """A few lines about a workload: size, duration, lengths, adapter mix."""
    if not specs:
        return "empty workload"
    mix = Counter(s.adapter or "<base>" for s in specs)
    top = ", ".join(f"{name} {n}" for name, n in mix.most_common(8))
    span = specs[-1].arrival_s
    hang_ups = sum(s.disconnect_after is not None for s in specs)
    return (f"{len(specs)} requests over {span:.1f}s of arrivals; prompt words mean "
            f"{sum(s.prompt_words for s in specs) / len(specs):.0f}, max_tokens mean "
            f"{sum(s.max_tokens for s in specs) / len(specs):.0f}; streaming {sum(s.stream for s in specs)}"
            f"{f' ({hang_ups} disconnect mid-stream)' if hang_ups else ''}; "
            f"{len(mix)} targets: {top}{' ...' if len(mix) > 8 else ''}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The workload flags, shared with loadtest/run.py."""
    g = p.add_argument_group("workload")
    g.add_argument("-n", "--num-requests", type=int, default=100)
    g.add_argument("--rate", type=float, default=math.inf,
                   help="requests/s, Poisson arrivals (default: inf, all at once)")
    g.add_argument("--prompt-len", type=LengthDist.parse, default=LengthDist.parse("uniform:16:128"),
                   help="prompt length in words: fixed:N | uniform:LO:HI | lognormal:MEDIAN:SIGMA[:MAX]")
    g.add_argument("--output-len", type=LengthDist.parse, default=LengthDist.parse("uniform:16:64"),
                   help="max_tokens per request, same syntax")
    g.add_argument("--adapters", default="",
                   help="comma-separated adapter names, most popular first ('auto' in run.py: those the "
                        "server lists in /v1/models; empty: base model only)")
    g.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity (0: uniform)")
    g.add_argument("--base-share", type=float, default=0.2, help="share of requests to the base model")
    g.add_argument("--stream-share", type=float, default=1.0, help="share of requests that stream")
    g.add_argument("--disconnect-share", type=float, default=0.0,
                   help="share of requests that stream and close the connection mid-stream")
    g.add_argument("--disconnect-after", type=LengthDist.parse, default=LengthDist.parse("fixed:2"),
                   help="text chunks such a client reads before it disconnects, same syntax as lengths")
    g.add_argument("--api", choices=("completions", "chat"), default="completions")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (output lengths then depend on the model)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tenant", dest="tenants", type=TenantArg.parse, action="append", default=[],
                   metavar="NAME=KEY[:WEIGHT]",
                   help="send a share of the traffic (by WEIGHT, default 1) as tenant NAME with API key KEY; "
                        "repeat per tenant (workload.py takes NAME[:WEIGHT] and ignores keys)")


def config_from_args(args: argparse.Namespace, adapters: tuple[str, ...]) -> WorkloadConfig:
    return WorkloadConfig(num_requests=args.num_requests, rate=args.rate, prompt_len=args.prompt_len,
                          output_len=args.output_len, adapters=adapters, zipf_s=args.zipf,
                          base_share=args.base_share, stream_share=args.stream_share, api=args.api,
                          ignore_eos=args.ignore_eos, temperature=args.temperature, seed=args.seed,
                          disconnect_share=args.disconnect_share, disconnect_after=args.disconnect_after,
                          tenants=tuple((t.name, t.weight) for t in args.tenants))


@dataclass(frozen=True)
class TenantArg:
    """`--tenant NAME=KEY[:WEIGHT]` (or `NAME[:WEIGHT]` where no key is needed)."""

    name: str
    key: str | None
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> TenantArg:
        name, sep, rest = text.partition("=")
        if not sep:
            name, rest = "", text
        head, colon, tail = rest.rpartition(":")
        weight = 1.0
        if colon:
            try:
                weight, rest = float(tail), head
            except ValueError:
                pass  # a colon inside the key
        if not sep:
            name, rest = rest, ""
        if not name or not weight > 0 or weight == math.inf:
            raise argparse.ArgumentTypeError(f"expected NAME=KEY[:WEIGHT] with WEIGHT > 0, got {text!r}")
        return cls(name, rest or None, weight)


def split_names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate a reproducible workload as JSONL.")
    add_arguments(p)
    p.add_argument("--out", type=Path, help="write JSONL here (default: only describe it)")
    args = p.parse_args(argv)
    if args.adapters.strip().lower() == "auto":
        p.error("--adapters auto asks a server: use it with loadtest/run.py, or name the adapters here")
    try:
        specs = generate(config_from_args(args, split_names(args.adapters)))
    except ValueError as exc:
        p.error(str(exc))
    print(describe(specs))
    if args.out:
        save(specs, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
