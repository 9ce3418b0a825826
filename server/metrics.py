"""Every Prometheus metric, defined in one place, on a registry owned by the app.

Three groups:
- `loramux_*`: the server's own series, per adapter where that helps tuning;
- `loramux_tenant_*`: per tenant (tenants come from configuration, so the label is bounded);
- `vllm:*` (in `Metrics.vllm`): vLLM's names, types and labels, read by the Gateway API
  Inference Extension's endpoint picker and by dashboards written for vLLM.

The state gauges (running, waiting, KV use) are computed at scrape time from the last
`EngineState` the engine published plus the requests handed to the engine thread and not yet
taken in, so a router never reads a queue length older than the last state change.

Where each is observed: the engine (its process) counts requests, tokens, TTFT and per-request
latencies as its steps take them in; the server side (the event loop, which receives each step's
outputs) observes the inter-token latencies, one per output token (`on_outputs`), so the
engine's step loop does no per-token metric work. The Prometheus plumbing that names nothing
(`CountedHistogram`, the two processes' merged `exposition`) is server/metric_types.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from server.metric_types import CountedHistogram, exposition  # noqa: F401 (exposition: the app's import)

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                    3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# vLLM's buckets, so that dashboards built for vLLM read the same quantiles.
_VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                      10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_VLLM_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                      20.0, 40.0, 80.0)
_VLLM_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                         120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# `tenant_requests` statuses: the engine's finish reasons (FinishReason's values; a test keeps
# them equal, this module imports nothing of ours) and the refusals.
FINISH_REASONS = ("stop", "length", "abort", "error")
RATE_LIMITED = "rate_limited"  # HTTP 429: over the tenant's own limits
OVERLOADED = "overloaded"  # HTTP 503: the server is full
REQUEST_STATUSES = (*FINISH_REASONS, RATE_LIMITED, OVERLOADED)
# The `adapter` label of the adapters past the series limit (not a valid adapter id, not the base's "").
OTHER_ADAPTERS = "(other)"


class TokenOutput(Protocol):
    """What `Metrics.on_outputs` reads of an engine output (server/engine/output_processor.py's
    RequestOutput; this module imports nothing of ours)."""

    request_id: str
    token_ids: list[int]
    finished: bool


@dataclass(frozen=True)
class EngineState:
    """The engine's state after its last change. Replaced whole (one reference store) by the
    engine thread, so a scrape on another thread always reads one consistent picture."""

    running: int = 0  # sequences running
    waiting: int = 0  # sequences queued in the scheduler
    kv_blocks_used: int = 0
    running_adapters: tuple[str, ...] = ()  # sorted names of the adapters of running sequences
    waiting_adapters: tuple[str, ...] = ()  # ... and of waiting ones


class VllmMetrics:
    """vLLM's series (names, types, labels as in vllm/v1/metrics/loggers.py): `model_name` is
    the served base model and `engine` the engine index ("0": loramux runs one engine)."""

    def __init__(self, r: CollectorRegistry):
        labels = ["model_name", "engine"]
        v = "vllm:"
        self.num_requests_running = Gauge(v + "num_requests_running", "Number of requests in model execution batches.",
                                          labels, registry=r)
        self.num_requests_waiting = Gauge(v + "num_requests_waiting", "Number of requests waiting to be processed.",
                                          labels, registry=r)
        self.kv_cache_usage_perc = Gauge(v + "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                         labels, registry=r)
        # The older name, still read by endpoint pickers configured for vLLM before 0.10.
        self.gpu_cache_usage_perc = Gauge(v + "gpu_cache_usage_perc",
                                          "KV-cache usage. 1 means 100 percent usage (older name).", labels,
                                          registry=r)
        # Value: the wall-clock time of the last update (the extension reads the newest series).
        self.lora_requests_info = Gauge(v + "lora_requests_info", "Running stats on lora requests.",
                                        ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
        self.cache_config_info = Gauge(v + "cache_config_info", "Information of the LLMEngine CacheConfig",
                                       ["block_size", "num_gpu_blocks", "engine"], registry=r)
        self.request_success = Counter(v + "request_success", "Count of successfully processed requests.",
                                       labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(v + "prompt_tokens", "Number of prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter(v + "generation_tokens", "Number of generation tokens processed.", labels,
                                         registry=r)
        self.num_preemptions = Counter(v + "num_preemptions", "Cumulative number of preemption from the engine.",
                                       labels, registry=r)
        self.prefix_cache_queries = Counter(v + "prefix_cache_queries", "Prefix cache queries, in terms of number "
                                            "of queried tokens.", labels, registry=r)
        self.prefix_cache_hits = Counter(v + "prefix_cache_hits", "Prefix cache hits, in terms of number of "
                                         "cached tokens.", labels, registry=r)
        self.time_to_first_token = Histogram(v + "time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.", labels,
                                             buckets=_VLLM_TTFT_BUCKETS, registry=r)
        # Per output token after a request's first, as vLLM (`Metrics.on_outputs`). vLLM 0.11 renamed
        # time_per_output_token_seconds and observes both names alike; both are here, for old and new dashboards.
        self.inter_token_latency = CountedHistogram(v + "inter_token_latency_seconds",
                                                    "Histogram of inter-token latency in seconds.",
                                                    _VLLM_TPOT_BUCKETS, r, tuple(labels))
        self.time_per_output_token = CountedHistogram(v + "time_per_output_token_seconds",
                                                      "Histogram of time per output token in seconds. DEPRECATED: "
                                                      "Use vllm:inter_token_latency_seconds instead.",
                                                      _VLLM_TPOT_BUCKETS, r, tuple(labels))
        # Per finished request: its mean time per output token after the first (0 under two tokens, as vLLM).
        self.request_time_per_output_token = Histogram(v + "request_time_per_output_token_seconds",
                                                       "Histogram of time_per_output_token_seconds per request.",
                                                       labels, buckets=_VLLM_TPOT_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(v + "e2e_request_latency_seconds",
                                             "Histogram of e2e request latency in seconds.", labels,
                                             buckets=_VLLM_REQUEST_BUCKETS, registry=r)
        self.request_queue_time = Histogram(v + "request_queue_time_seconds",
                                            "Histogram of time spent in WAITING phase for request.", labels,
                                            buckets=_VLLM_REQUEST_BUCKETS, registry=r)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "loramux_"
        self.requests = Counter(p + "requests", "Requests finished, by finish reason", ["finish_reason", "adapter"],
                                registry=r)
        self.http_errors = Counter(p + "http_errors", "Error responses, by status and error code",
                                   ["status", "code"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter(p + "preemptions", "Sequences preempted (KV cache full; recomputed later)",
                                   registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token", ["adapter"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Mean inter-token time of a request",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to last token", ["adapter"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram(p + "step_seconds", "Engine step wall time", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.step_tokens = Histogram(p + "step_tokens", "Tokens in one engine step",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                                     registry=r)
        # Computed at scrape time (see the module docstring).
        self.running = Gauge(p + "requests_running", "Sequences running", registry=r)
        self.waiting = Gauge(p + "requests_waiting",
                             "Requests waiting: queued in the scheduler or handed to the engine thread", registry=r)
        self.kv_blocks_used = Gauge(p + "kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge(p + "kv_blocks_total", "KV cache blocks in all", registry=r)
        # Server process, at scrape time from the core's heartbeats (core_client.ProcessEngine).
        self.engine_step_age = Gauge(p + "engine_step_age_seconds", "How long the engine loop's current "
                                     "iteration (a step and the messages before it) has run; 0 while it waits for "
                                     "work. Over --engine-step-timeout the server answers 503", registry=r)
        # Adapter tiers: disk -> host cache -> device slots.
        self.adapter_cache_hits = Counter(p + "adapter_cache_hits", "Adapter requests found in the host cache",
                                          registry=r)
        self.adapter_cache_misses = Counter(p + "adapter_cache_misses", "Adapter requests that needed a load",
                                            registry=r)
        self.adapter_loads = Counter(p + "adapter_loads", "Adapter loads from disk, by result", ["result"],
                                     registry=r)
        self.adapter_load_seconds = Histogram(p + "adapter_load_seconds", "Read + parse + validate one adapter",
                                              buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter_evictions = Counter(p + "adapter_evictions", "Adapters evicted, by tier (host | device)",
                                         ["tier"], registry=r)
        self.adapters_resident = Gauge(p + "adapters_resident", "Adapters resident, by tier (host | device)",
                                       ["tier"], registry=r)
        self.adapter_slot_writes = Counter(p + "adapter_slot_writes", "Adapters copied into a device slot",
                                           registry=r)
        self.adapter_pool_pages = Gauge(p + "adapter_pool_pages", "Pages of the device adapter pool, by state "
                                        "(used | free); an adapter of rank r takes ceil(r / page rank)",
                                        ["state"], registry=r)
        # Per tenant (tenants are declared in the tenants file: bounded cardinality).
        self.tenant_requests = Counter(p + "tenant_requests", "Requests by tenant and outcome: a finish reason, "
                                       "or rate_limited (429) / overloaded (503)", ["tenant", "status"], registry=r)
        self.tenant_vtc = Gauge(p + "tenant_virtual_tokens", "Fair-scheduling (VTC) counter: weighted tokens served "
                                "per unit of the tenant's weight", ["tenant"], registry=r)
        self.step_adapters = Histogram(p + "step_adapters", "Distinct adapters in one engine step",
                                       buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        # More per tenant. (`tenant_requests` statuses are REQUEST_STATUSES; the refusals are counted
        # by the code that refuses: quotas RATE_LIMITED, admission OVERLOADED. The fair (VTC)
        # scheduler sets `tenant_vtc`.)
        self.tenant_prompt_tokens = Counter(p + "tenant_prompt_tokens", "Prompt tokens prefilled, by tenant",
                                            ["tenant"], registry=r)
        self.tenant_generation_tokens = Counter(p + "tenant_generation_tokens", "Tokens generated, by tenant",
                                                ["tenant"], registry=r)
        self.tenant_ttft = Histogram(p + "tenant_time_to_first_token_seconds", "Arrival to first token, by tenant",
                                     ["tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tenant_queue_time = Histogram(p + "tenant_queue_time_seconds",
                                           "Arrival to first scheduled (queueing), by tenant", ["tenant"],
                                           buckets=_LATENCY_BUCKETS, registry=r)
        # Expert libraries (issue 12): requests running a weighted mixture of adapters or routed
        # per token among them, and how many experts each LoRA token of a step uses.
        self.tenant_mixture_requests = Counter(p + "tenant_mixture_requests",
                                               "Requests (generations) with an adapter mixture, by tenant",
                                               ["tenant"], registry=r)
        self.tenant_routed_requests = Counter(p + "tenant_routed_requests",
                                              "Requests (generations) routed among adapters (Arrow), by tenant",
                                              ["tenant"], registry=r)
        self.experts_per_token = CountedHistogram(p + "experts_per_lora_token", "Adapters whose delta one LoRA "
                                                  "token computes: 1 (one adapter), k (a mixture of k), top_k (routed)",
                                                  buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.vllm = VllmMetrics(r)

        self._state = EngineState()
        self._sent = 0  # requests handed to the engine thread (written by the asyncio thread only)
        self._received = 0  # ... and taken in by it (written by the engine thread only)
        self._in_transit: Callable[[], int] = lambda: 0  # server process: sent to the core, not yet answered
        self._num_blocks = 0
        self._tenants: set[str] | None = None  # the configured tenants (None: not told, all counted)
        self._adapters: set[str] = set()  # adapters with series of their own
        self._adapter_series_limit: int | None = None
        self._lora_info_labels: tuple[str, str, str] | None = None
        self._max_lora: int | None = None
        self._engine_labels = ("", "0")
        self._last_token: dict[str, float] = {}  # request id -> when its last output came (server side)
        self.running.set_function(lambda: self._state.running)
        self.waiting.set_function(self._num_waiting)
        self.kv_blocks_used.set_function(lambda: self._state.kv_blocks_used)

    # --- engine state ------------------------------------------------------------------------
    def configure_engine(self, model_name: str, block_size: int, num_blocks: int, max_loras: int | None,
                         adapter_series: int | None = None) -> None:
        """Once, when the engine is built. `max_loras`: distinct adapters one step may use
        (`AdapterManager.step_capacity`), None without LoRA. `adapter_series`: adapters that get
        series of their own on the per-adapter metrics (None: all); see `_adapter`."""
        self._num_blocks = num_blocks
        self._max_lora = max_loras
        self._adapter_series_limit = adapter_series
        self._set_engine_labels(model_name)
        self.kv_blocks_total.set(num_blocks)
        v = self.vllm
        v.num_requests_running.labels(*self._engine_labels).set_function(lambda: self._state.running)
        v.num_requests_waiting.labels(*self._engine_labels).set_function(self._num_waiting)
        v.kv_cache_usage_perc.labels(*self._engine_labels).set_function(self._kv_usage)
        v.gpu_cache_usage_perc.labels(*self._engine_labels).set_function(self._kv_usage)
        v.cache_config_info.labels(str(block_size), str(num_blocks), "0").set(1)
        for counter in (v.prompt_tokens, v.generation_tokens, v.num_preemptions, v.prefix_cache_queries,
                        v.prefix_cache_hits):
            counter.labels(*self._engine_labels)  # present (at 0) before the first request
        self.publish(self._state)

    def publish(self, state: EngineState) -> None:
        """Engine thread, at every change of its state (a request queued, admitted, finished, aborted)."""
        self._state = state
        if self._max_lora is None:
            return
        labels = (str(self._max_lora), ",".join(state.waiting_adapters), ",".join(state.running_adapters))
        # vLLM sets the value to the time of the update. The new series first, then the old one
        # goes: a scrape in between sees both and takes the newer, never none.
        self.vllm.lora_requests_info.labels(*labels).set(time.time())
        if self._lora_info_labels not in (None, labels):
            self.vllm.lora_requests_info.remove(*self._lora_info_labels)
        self._lora_info_labels = labels

    def request_sent(self) -> None:
        """A request was handed to the engine thread (asyncio thread): it counts as waiting from now."""
        self._sent += 1

    def request_received(self) -> None:
        """The engine thread took in a request that `request_sent` announced (queued or refused)."""
        self._received += 1

    def count_in_transit(self, model_name: str, in_transit: Callable[[], int]) -> None:
        """The server process's share of the waiting gauges with the engine core in a process of its
        own: `in_transit()` requests sent to the core and not yet answered (admitted or refused).
        The core's own series carry its queue; the scrape sums the two (`exposition`). A request
        counts in both for the moment between the core queueing it and its answer arriving here."""
        self._in_transit = in_transit
        self._set_engine_labels(model_name)
        self.vllm.num_requests_waiting.labels(*self._engine_labels).set_function(self._num_waiting)

    def watch_engine_loop(self, step_age: Callable[[], float]) -> None:
        """The server process's view of the core's loop: `step_age()` seconds into its current iteration."""
        self.engine_step_age.set_function(step_age)

    def _set_engine_labels(self, model_name: str) -> None:
        self._engine_labels = (model_name, "0")
        self.vllm.inter_token_latency.set_labels(*self._engine_labels)
        self.vllm.time_per_output_token.set_labels(*self._engine_labels)

    def _num_waiting(self) -> int:
        return self._state.waiting + max(0, self._sent - self._received) + self._in_transit()

    def _kv_usage(self) -> float:
        return self._state.kv_blocks_used / self._num_blocks if self._num_blocks else 0.0

    # --- per request (engine thread) ------------------------------------------------------------
    def on_scheduled(self, tenant: str, queue_time: float) -> None:
        """A request was scheduled for the first time, `queue_time` seconds after it arrived."""
        if self._configured(tenant):
            self.tenant_queue_time.labels(tenant).observe(queue_time)
        self.vllm.request_queue_time.labels(*self._engine_labels).observe(queue_time)

    def _adapter(self, name: str) -> str:
        """The `adapter` label of `name` ("" the base): its own until the limit of adapters with
        series is reached (first come, a place freed when an adapter is unloaded), then
        OTHER_ADAPTERS. Each labelled adapter costs ~80 series (three histograms); unbounded, a
        server that served 10,000 adapters would scrape 800,000 lines (65 MB, seconds of CPU)."""
        if not name or name in self._adapters:
            return name
        if self._adapter_series_limit is not None and len(self._adapters) >= self._adapter_series_limit:
            return OTHER_ADAPTERS
        self._adapters.add(name)
        return name

    def on_first_token(self, tenant: str, adapter: str, num_prompt_tokens: int, ttft: float) -> None:
        adapter = self._adapter(adapter)
        self.ttft.labels(adapter).observe(ttft)
        if self._configured(tenant):
            self.tenant_ttft.labels(tenant).observe(ttft)
            self.tenant_prompt_tokens.labels(tenant).inc(num_prompt_tokens)
        self.vllm.time_to_first_token.labels(*self._engine_labels).observe(ttft)
        self.vllm.prompt_tokens.labels(*self._engine_labels).inc(num_prompt_tokens)

    def on_generated(self, tokens_by_tenant: dict[str, int]) -> None:
        """Tokens sampled in one step."""
        total = 0
        for tenant, n in tokens_by_tenant.items():
            if self._configured(tenant):
                self.tenant_generation_tokens.labels(tenant).inc(n)
            total += n
        self.generation_tokens.inc(total)
        self.vllm.generation_tokens.labels(*self._engine_labels).inc(total)

    def on_experts_request(self, tenant: str, mixture: bool) -> None:
        """A mixture (else a routed) request was queued."""
        if self._configured(tenant):
            (self.tenant_mixture_requests if mixture else self.tenant_routed_requests).labels(tenant).inc()

    def on_lora_tokens(self, tokens_by_experts: dict[int, int]) -> None:
        """One step's LoRA tokens: experts per token -> how many tokens (one observation per token)."""
        for experts, n in tokens_by_experts.items():
            self.experts_per_token.observe(experts, n)

    def on_preempted(self, n: int) -> None:
        self.preemptions.inc(n)
        self.vllm.num_preemptions.labels(*self._engine_labels).inc(n)

    def on_prefix_cache(self, queried: int, hits: int) -> None:
        """Sequences admitted: `queried` tokens looked up in the prefix cache, `hits` of them found."""
        self.vllm.prefix_cache_queries.labels(*self._engine_labels).inc(queried)
        self.vllm.prefix_cache_hits.labels(*self._engine_labels).inc(hits)

    def on_finish(self, tenant: str, adapter: str, reason: str, num_prompt_tokens: int, e2e: float,
                  tpot: float | None) -> None:
        """A request left the engine. `tpot`: mean seconds between its output tokens (None under two)."""
        adapter = self._adapter(adapter)
        self.requests.labels(reason, adapter).inc()
        if self._configured(tenant):
            self.tenant_requests.labels(tenant, reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.e2e.labels(adapter).observe(e2e)
        self.vllm.request_success.labels(*self._engine_labels, reason).inc()
        self.vllm.e2e_request_latency.labels(*self._engine_labels).observe(e2e)
        self.vllm.request_time_per_output_token.labels(*self._engine_labels).observe(tpot or 0.0)
        if tpot is not None:
            self.tpot.labels(adapter).observe(tpot)

    # --- per output (server side: the event loop that receives the engine's outputs) ----------------
    def on_outputs(self, outputs: Sequence[TokenOutput], now: float) -> None:
        """One engine step's outputs, produced at `now` (monotonic seconds, the engine's clock):
        an output after a request's first observes the interval since that request's previous
        output once per token it carries, the interval shared evenly among them (vLLM's rule: a
        stream of N tokens gives N - 1 observations). O(outputs) dict and bucket work, no call per token."""
        last = self._last_token
        itl, old_name = self.vllm.inter_token_latency, self.vllm.time_per_output_token
        for out in outputs:
            n = len(out.token_ids)
            if n:
                previous = last.get(out.request_id)
                if previous is not None:
                    interval = (now - previous) / n
                    itl.observe(interval, n)
                    old_name.observe(interval, n)
                last[out.request_id] = now
            if out.finished:
                last.pop(out.request_id, None)

    def forget_request(self, request_id: str) -> None:
        """A request ended without a finished output reaching `on_outputs` (aborted, failed)."""
        self._last_token.pop(request_id, None)

    # --- bounded label sets ---------------------------------------------------------------------
    def _configured(self, tenant: str) -> bool:
        """Whether `tenant` has series: a tenant a reload removed has none, and the requests it
        still had in flight must not bring them back as they end."""
        return self._tenants is None or tenant in self._tenants

    def set_tenants(self, names: Iterable[str]) -> None:
        """The configured tenants (at start and after every reload). New ones get their series at 0,
        so a dashboard shows them before their first request; removed ones lose their series."""
        names, known = set(names), self._tenants or set()
        for gone in known - names:
            self._forget("tenant", gone)
        for tenant in names - known:
            for status in REQUEST_STATUSES:
                self.tenant_requests.labels(tenant, status)
            for m in (self.tenant_prompt_tokens, self.tenant_generation_tokens, self.tenant_ttft,
                      self.tenant_queue_time, self.tenant_mixture_requests, self.tenant_routed_requests):
                m.labels(tenant)
            self.tenant_vtc.labels(tenant).set(0)
        self._tenants = names

    def forget_adapter(self, name: str) -> None:
        """Drop the series of an unloaded adapter (its label would otherwise live forever); its
        place among the adapters with series of their own is free again."""
        if name in self._adapters:
            self._adapters.discard(name)
            self._forget("adapter", name)

    def _forget(self, label: str, value: str) -> None:
        """Remove every series, of every metric, whose `label` is `value`."""
        for metric in vars(self).values():
            if not isinstance(metric, MetricWrapperBase) or label not in metric._labelnames:
                continue
            children = {tuple(s.labels[n] for n in metric._labelnames)
                        for family in metric.collect() for s in family.samples
                        if s.labels.get(label) == value and all(n in s.labels for n in metric._labelnames)}
            for labels in children:
                metric.remove(*labels)
