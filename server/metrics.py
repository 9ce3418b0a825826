"""Every Prometheus metric, defined in one place, on a registry owned by the app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                    3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


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
        self.running = Gauge(p + "requests_running", "Sequences running", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Sequences waiting", registry=r)
        self.kv_blocks_used = Gauge(p + "kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge(p + "kv_blocks_total", "KV cache blocks in all", registry=r)
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
        # Per tenant (tenants are declared in the tenants file: bounded cardinality).
        self.tenant_requests = Counter(p + "tenant_requests", "Requests by tenant and outcome: a finish reason, "
                                       "or rate_limited (429) / overloaded (503)", ["tenant", "status"], registry=r)
        self.tenant_vtc = Gauge(p + "tenant_virtual_tokens", "Fair-scheduling (VTC) counter: weighted tokens served "
                                "per unit of the tenant's weight", ["tenant"], registry=r)
        self.step_adapters = Histogram(p + "step_adapters", "Distinct adapters in one engine step",
                                       buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
