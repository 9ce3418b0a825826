"""The one configuration tree.

Precedence, lowest first: dataclass defaults < config file (`--config x.toml|x.json`)
< environment (`LORAMUX_<FLAG>`, e.g. `LORAMUX_MAX_NUM_SEQS=32`) < command-line flags.
Every setting has one flag (declared in `server/cli.py`), and the flag's name is also
its config-file key and its environment variable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1 << 30


@dataclass
class ModelConfig:
    path: str | None = None  # None: the default model, converted on first use
    dtype: str = "auto"  # auto | bfloat16 | float32; auto = bf16 on GPU / on CPUs with fast bf16
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped, see runner)
    served_model_name: str | None = None  # the `model` id of the base; default: directory name
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU; None: all cores
    attention_backend: str = "auto"  # auto | cpp | torch | triton (server/engine/backends/)
    enforce_eager: bool = False  # no CUDA graphs for decode steps (server/engine/cuda_graphs.py)
    cuda_graph_sizes: tuple[int, ...] | None = None  # decode batch sizes captured; None: the ladder (cuda_graphs.py)


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    # Bytes for the whole paged KV cache, on every device. None: HOST_KV_CACHE_MEMORY off CUDA; on
    # CUDA what gpu_memory_utilization leaves after the weights, the adapter pool, a profile step's
    # activations and the CUDA graphs (server/engine/memory_plan.py).
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9  # the fraction of the GPU's memory the engine may hold, in (0, 1]
    # Reuse computed KV blocks of identical prompt prefixes (per tenant and adapter; as vLLM's
    # automatic prefix caching, on by default there too).
    prefix_caching: bool = True

    HOST_KV_CACHE_MEMORY = 2 * GiB


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    # Requests pending in the engine (running + queued) before new ones get an immediate 503.
    # None: PENDING_PER_SEQ x max_num_seqs, i.e. the running batch plus two batches queued, so an
    # accepted request starts within about two request lifetimes and overload shows as fast
    # refusals (a router or client retries elsewhere) instead of minutes in a queue.
    max_waiting: int | None = None
    scheduling: str | None = None  # fcfs | vtc; None: vtc when tenants are configured, else fcfs
    vtc_input_weight: float = 1.0  # VTC cost of a prompt token (w_p)
    vtc_output_weight: float = 2.0  # VTC cost of an output token (w_q)
    prefetch_window: int = 16  # waiting requests, in policy order, whose adapters are loaded ahead
    max_wait_steps: int = 32  # steps a request may be passed over for its adapter before it goes first
    # Schedule and launch step N+1 before taking in step N's tokens (vLLM's --async-scheduling):
    # the host's scheduling and output work overlaps the device's step instead of idling it.
    async_scheduling: bool = False

    PENDING_PER_SEQ = 3

    @property
    def pending_limit(self) -> int:
        return self.max_waiting if self.max_waiting is not None else self.PENDING_PER_SEQ * self.max_num_seqs


@dataclass
class LoraConfig:
    enabled: bool = True
    adapters_dir: str | None = "adapters_store"  # scanned at start: one PEFT directory per adapter id
    # The device adapter pool, in bytes: adapters take rank-unit pages of it (server/adapters/slots.py),
    # at most max_cpu_loras adapters (the pool is filled from the host cache); a step may use as
    # many distinct adapters as their pages fit. 2 GiB: 24 rank-16 adapters of an 8B model in bf16
    # (the old fixed 8 slots took 0.66 GiB), the whole host cache of SmolLM2-135M ones.
    lora_pool_memory: int = 2 * GiB
    max_loras: int | None = None  # optional extra limit on distinct adapters in one step (None: the pool's)
    max_cpu_loras: int = 64  # adapters kept parsed in host memory (LRU)
    cpu_lora_cache_memory: int = 4 * GiB  # bytes budget of that host cache
    # Threads that read, check and place loads (None: 1 on CPU, where the steps need the cores; 4 on
    # a GPU, whose host cores idle while it steps, so a wave of cold adapters loads in parallel).
    adapter_loaders: int | None = None
    max_lora_rank: int = 16  # adapters up to this rank are served (as vLLM's default)
    # The pool's page rank: an adapter of rank r takes ceil(r / page rank) pages. None: the LoRA
    # backend's choice (triton: 16 where it divides max_lora_rank; torch: max_lora_rank, unpaged).
    lora_page_rank: int | None = None
    # Adapters with series of their own on the per-adapter metrics (first come); the others share
    # adapter="(other)". None: no limit (Prometheus cardinality then grows with adapters served).
    adapter_metric_series: int | None = 100
    # Expert libraries (a request's `adapters` mixture or `route`): per-request limits.
    max_mixture_experts: int = 8  # adapters in one mixture
    max_mixture_rank: int = 128  # total rank of one mixture (an adapter not read yet counts max_lora_rank)
    max_route_experts: int = 16  # experts one route chooses among
    lora_dtype: str = "auto"  # auto (float32 on CPU, the model dtype on GPU) | float32 | bfloat16
    lora_backend: str = "auto"  # auto | torch | triton (server/engine/backends/)
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> path, as vLLM
    allowed_adapter_roots: list[str] = field(default_factory=list)  # where admin loads may read from


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant (no limits); see `tenants`
    tenants: str | None = None  # tenants file (TOML); with neither this nor api_keys the server is open
    admin_key: str | None = None
    log_level: str = "info"
    max_body_bytes: int = 8 << 20  # request bodies over this get 413 (counted as read, chunked too)
    shutdown_timeout: float = 30.0  # seconds after SIGTERM for in-flight requests to finish before they are aborted
    engine_process: bool = True  # the engine core in its own process (server/engine/core_client.py); off: a thread
    # With the engine core in its own process: seconds without any message from it (it sends a
    # heartbeat every second) before the server counts it as not responding and answers 503.
    engine_heartbeat_timeout: float = 10.0
    # Seconds one iteration of the core's engine loop (a step, and the messages handled before it)
    # may run before the server counts the loop as hung and answers 503 until it completes; 0: no
    # limit. Waiting for work never counts. The default is far above any legitimate step: one of
    # --max-num-batched-tokens 512 at the end of an 8k context of the default model takes seconds
    # on one loaded CPU core; a model 50x its size on CPU, or a first Triton compile on a GPU, minutes.
    engine_step_timeout: float = 300.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def parse_bytes(value: str | int | float) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    text = value.strip().lower().replace(" ", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(float(text))
