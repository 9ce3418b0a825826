"""What a request asks for, and the engine's state for one sequence."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from server.adapters.registry import AdapterRef


# What torch's generators accept as a seed: the API takes OpenAI's int64, and choice i of
# `n` samples with seed + i, which stays in this range.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_LOGPROBS = 20  # top alternatives per token
MAX_STOP = 16  # stop strings per request
MAX_EXPERTS = 256  # names in one `adapters` / `route.experts` list (a wire bound; the flags limit further)


class InvalidRequestError(ValueError):
    """A request that cannot run: an HTTP 400 naming the offending parameter, or a 404 when
    `code` is "model_not_found" (its adapter is not, or no longer, registered)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


# A temperature below this samples greedily (its limit; vLLM's threshold too): logits / 1e-39
# overflow float32, and a softmax of infs is NaN.
MIN_TEMPERATURE = 1e-5
# The smallest repetition penalty (10, the largest, inverted and then some): a positive logit is
# divided by it, and 5e-324 is 0 in float32, so a tiny one made every repeated token's score inf.
MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # HF semantics, over prompt + output tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, over output tokens
    presence_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's + top-k
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def validate(self) -> None:
        def bad(param: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {rule}, got {getattr(self, param)!r}", param)

        def finite(v: float) -> bool:
            return isinstance(v, (int, float)) and math.isfinite(v)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if not finite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "must be in [0, 2]")
        if not finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (off) or a positive integer")
        if not finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not finite(self.repetition_penalty) or not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, 10]")
        for name in ("frequency_penalty", "presence_penalty"):
            if not finite(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise bad("seed", f"must be an integer in [{SEED_MIN}, {SEED_MAX}]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if len(self.stop) > MAX_STOP or any(not s for s in self.stop):
            raise bad("stop", f"must be at most {MAX_STOP} non-empty strings")


@dataclass(frozen=True)
class Mixture:
    """Weighted sum of adapters' deltas (PEFT `add_weighted_adapter(..., combination_type="cat")`):
    delta(x) = sum_i weights[i] * scaling_i * B_i A_i x. Weights are finite, any sign."""

    adapters: tuple[AdapterRef | str, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Route:
    """Arrow routing per token, layer and projection among `adapters` (PEFT `ArrowConfig`):
    softmax(top_k |prototype . x| / temperature) weights the experts kept."""

    adapters: tuple[AdapterRef | str, ...]
    top_k: int
    temperature: float


Experts = Mixture | Route


@dataclass
class GenerationRequest:
    """One generation as submitted to the engine (already tokenized)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # The adapter: a name or a resolved version (the engine swaps in the version it acquired,
    # held until the request finishes); None = the base model.
    adapter: AdapterRef | str | None = None
    tenant: str = "default"
    # A mixture or a route over adapters (with `adapter` None); the engine swaps in the
    # versions it acquired, as for `adapter`.
    experts: Experts | None = None
    arrival_time: float = field(default_factory=time.monotonic)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled: client gone, or shutdown
    ERROR = "error"


@dataclass(eq=False)  # one object per request: equal means the same (and list.remove stays cheap)
class Sequence:
    """Engine-side state of one request. Owned by the engine thread."""

    request: GenerationRequest
    token_ids: list[int]  # prompt followed by output tokens
    num_prompt_tokens: int
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # Tokens sampled by a step still in flight (async scheduling): each holds the position past
    # `token_ids` that it will fill; the next step reads it on the device (0 or 1 when scheduling).
    num_pending: int = 0
    # Output tokens made but never delivered: the server process found a stop string before them
    # (--engine-process on) and cut them (the scheduling policy gives back what it charged).
    num_cut: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    rng: Any = None  # sampler-owned per-sequence generator (seeded requests)
    # Every adapter this sequence needs resident and in the step's pool (distinct): its adapter,
    # its experts', or none (the base). Fixed with the request; read per sequence every step.
    adapters: tuple = field(init=False)
    # The prefix cache's (server/engine/kv_cache.py): its full blocks' digests so far, and how
    # many of its blocks are in the cache.
    block_digests: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens the prefix cache held at its first admission
    cache_epoch: int = 0  # the prefix cache's epoch when it was queued (part of its namespace)

    def __post_init__(self) -> None:
        experts, adapter = self.request.experts, self.request.adapter
        self.adapters = experts.adapters if experts is not None else () if adapter is None else (adapter,)

    @classmethod
    def from_request(cls, request: GenerationRequest) -> Sequence:
        return cls(request=request, token_ids=list(request.prompt_token_ids),
                   num_prompt_tokens=len(request.prompt_token_ids))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def adapter(self) -> str | None:
        return self.request.adapter

    @property
    def experts(self) -> Experts | None:
        return self.request.experts

    @property
    def num_tokens(self) -> int:
        """Positions the sequence has: its known tokens and the pending ones."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_sampled(self) -> bool:
        """Whether steps have sampled all `max_tokens` of it (some may be pending): another step
        would compute a token past its end."""
        return self.num_output_tokens + self.num_pending >= self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
