"""`loramux serve | fetch-default-model | tenants add-key`.

Each setting is declared once in FLAGS: its command-line flag, its config-file key (the
flag name, dashes or underscores) and its environment variable (`LORAMUX_` + the name
in upper case with underscores). Precedence: defaults < --config file < env < flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import Config, parse_bytes

_UNSET = object()


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _on_off(value: Any) -> bool:
    text = str(value).strip().lower()
    if isinstance(value, bool) or text in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        return _bool(value)
    raise ValueError(f"expected on or off, got {value!r}")


def _pairs(value: Any) -> dict[str, str]:
    """'a=x b=y', ['a=x', 'b=y'] or {'a': 'x'} -> {'a': 'x', 'b': 'y'}."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    out = {}
    for item in items:
        name, sep, rest = str(item).partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        out[name] = rest
    return out


def _int(low: int, high: int | None = None) -> Callable[[Any], int]:
    """An integer in [low, high]: a value the engine cannot run (0 sequences, 0 tokens per step, a
    block of 0 tokens, a port past 65535) is refused at start, not met as a hang or a traceback."""
    def convert(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        number = int(value)
        if number < low or (high is not None and number > high):
            raise ValueError(f"expected an integer {'>= ' + str(low) if high is None else f'from {low} to {high}'}, "
                             f"got {value!r}")
        return number
    return convert


def _size(value: Any) -> int:
    """A byte size > 0 ('2GiB', '512MiB', a number)."""
    size = parse_bytes(value)
    if size < 1:
        raise ValueError(f"expected a size > 0 (bytes, or e.g. 512MiB), got {value!r}")
    return size


def _fraction(value: Any) -> float:
    fraction = float(value)
    if not 0 < fraction <= 1:  # also refuses NaN
        raise ValueError(f"expected a fraction in (0, 1], e.g. 0.9, got {value!r}")
    return fraction


def _choice(*names: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        name = str(value).strip().lower()
        if name not in names:
            raise ValueError(f"expected one of {', '.join(names)}, got {value!r}")
        return name
    return convert


def _device(value: Any) -> str:
    name = str(value).strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return name


def _seconds(value: Any) -> float:
    seconds = float(value)
    if not seconds >= 0:  # also refuses NaN
        raise ValueError(f"expected a number of seconds >= 0, got {value!r}")
    return seconds


def _heartbeat_seconds(value: Any) -> float:
    """At least 1 s: the core beats at most 20 times a second, and a timeout should span several."""
    seconds = float(value)
    if not 1 <= seconds < float("inf"):  # also refuses NaN
        raise ValueError(f"expected a number of seconds >= 1, got {value!r}")
    return seconds


def _scheduling(value: Any) -> str:
    from server.engine.policies import POLICIES

    name = str(value).strip().lower()
    if name not in POLICIES:
        raise ValueError(f"--scheduling: expected one of {', '.join(POLICIES)}, got {value!r}")
    return name


def _cost(value: Any) -> float:
    cost = float(value)
    if not 0 <= cost < float("inf"):
        raise ValueError(f"a token cost must be a number >= 0, got {value!r}")
    return cost


def _backend(kind: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        from server.engine.backends import ATTENTION_BACKENDS, LORA_BACKENDS

        names = ATTENTION_BACKENDS if kind == "attention" else LORA_BACKENDS
        name = str(value).strip().lower()
        if name != "auto" and name not in names:
            raise ValueError(f"--{kind}-backend: expected auto or one of {', '.join(names)}, got {value!r}")
        return name
    return convert


def _paths(value: Any) -> list[str]:
    return value.replace(",", " ").split() if isinstance(value, str) else [str(v) for v in value]


def _sizes(value: Any) -> tuple[int, ...]:
    """'1,8,64', '1 8 64' or [1, 8, 64] -> (1, 8, 64): distinct positive ints, ascending."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    sizes = sorted({int(v) for v in items})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"expected batch sizes >= 1, got {value!r}")
    return tuple(sizes)


@dataclass(frozen=True)
class Flag:
    name: str
    path: str  # "section.field" in Config
    convert: Callable[[Any], Any]
    help: str
    nargs: str | None = None
    switch: bool = False  # a bare flag that sets the value to `switch_value`
    switch_value: Any = True

    @property
    def env(self) -> str:
        return "LORAMUX_" + self.name.upper().replace("-", "_")


FLAGS = [
    Flag("model", "model.path", str, "Hugging Face model directory of a registered family "
         "(server/model/families.py; default: the converted SmolLM2-135M-Instruct)"),
    Flag("served-model-name", "model.served_model_name", str, "`model` id of the base in the API"),
    Flag("dtype", "model.dtype", _choice("auto", "bfloat16", "float32"),
         "auto | bfloat16 | float32 (auto: bf16 where the hardware has fast bf16)"),
    Flag("device", "model.device", _device, "auto | cpu | cuda | cuda:N"),
    Flag("max-model-len", "model.max_model_len", _int(1), "longest prompt + completion in tokens"),
    Flag("seed", "model.seed", int, "seed of unseeded sampling"),
    Flag("num-threads", "model.num_threads", _int(1), "torch CPU threads (default: all cores)"),
    Flag("attention-backend", "model.attention_backend", _backend("attention"),
         "auto | cpp | torch | triton (auto: cpp on CPU, triton on CUDA, else torch; chosen at start)"),
    Flag("enforce-eager", "model.enforce_eager", _bool, "run every step eagerly: no CUDA graphs for decode "
         "steps (as vLLM; graphs are used on CUDA with the triton attention and LoRA backends)", switch=True),
    Flag("cuda-graph-sizes", "model.cuda_graph_sizes", _sizes, "decode batch sizes to capture as CUDA graphs, e.g. "
         "1,8,64,256 (default: 1, 2, 4, 8, then every multiple of 8 up to --max-num-seqs); a batch replays the "
         "smallest size that holds it, a batch above the largest runs eagerly"),
    Flag("block-size", "cache.block_size", _int(1), "tokens per KV-cache block"),
    Flag("kv-cache-memory", "cache.kv_cache_memory", _size, "KV-cache size: bytes or e.g. 2GiB, 512MiB, on every "
         "device (default: 2GiB on CPU; on CUDA what --gpu-memory-utilization leaves)"),
    Flag("gpu-memory-utilization", "cache.gpu_memory_utilization", _fraction, "on CUDA without --kv-cache-memory: "
         "the fraction of the GPU's memory this server may hold (weights, adapter pool, activations, CUDA graphs "
         "and the KV cache, which gets the rest), as vLLM"),
    Flag("no-prefix-caching", "cache.prefix_caching", _bool, "compute every prompt in full: no reuse of the KV "
         "blocks of a prefix another request of the same tenant and adapter computed", switch=True,
         switch_value=False),
    Flag("max-num-seqs", "scheduler.max_num_seqs", _int(1), "sequences running at once"),
    Flag("max-num-batched-tokens", "scheduler.max_num_batched_tokens", _int(1),
         "tokens per engine step (prefill chunk + decodes)"),
    Flag("max-waiting", "scheduler.max_waiting", _int(1), "requests pending in the engine (running + queued) before "
         "new ones get an immediate HTTP 503 (None: 3 x --max-num-seqs)"),
    Flag("scheduling", "scheduler.scheduling", _scheduling, "admission policy: fcfs | vtc (fair share between "
         "tenants; default when --tenants or --api-keys is given, else fcfs); see docs/operator.md"),
    Flag("vtc-input-weight", "scheduler.vtc_input_weight", _cost, "VTC cost of a prompt token"),
    Flag("vtc-output-weight", "scheduler.vtc_output_weight", _cost, "VTC cost of an output token"),
    Flag("prefetch-window", "scheduler.prefetch_window", _int(1),
         "waiting requests (in scheduling order) whose adapters are loaded ahead of admission"),
    Flag("max-wait-steps", "scheduler.max_wait_steps", _int(0),
         "steps a request may be passed over because of its adapter before it goes first (starvation bound)"),
    Flag("async-scheduling", "scheduler.async_scheduling", _bool, "schedule and launch each step before taking "
         "in the previous one's tokens, so the host's work overlaps the GPU's (as vLLM); same tokens",
         switch=True),
    Flag("adapters-dir", "lora.adapters_dir", str, "adapter store scanned at start: one PEFT directory per adapter id"),
    Flag("lora-modules", "lora.lora_modules", _pairs, "NAME=PATH ... extra adapters to serve, as vLLM", nargs="+"),
    Flag("lora-pool-memory", "lora.lora_pool_memory", _size, "device adapter pool size: bytes or e.g. "
         "2GiB; a step may use as many distinct adapters as their pages fit (see --lora-page-rank)"),
    Flag("max-loras", "lora.max_loras", _int(1), "optional limit on distinct adapters in one step (default: as "
         "many as the adapter pool holds)"),
    Flag("max-cpu-loras", "lora.max_cpu_loras", _int(1), "adapters kept parsed in host memory (LRU)"),
    Flag("cpu-lora-cache-memory", "lora.cpu_lora_cache_memory", _size, "bytes budget of that host cache"),
    Flag("adapter-loaders", "lora.adapter_loaders", _int(1), "threads loading adapters (read, check, place in the "
         "pool) in parallel; default 1 on CPU, 4 on a GPU"),
    Flag("max-lora-rank", "lora.max_lora_rank", _int(1), "largest adapter rank served"),
    Flag("lora-page-rank", "lora.lora_page_rank", _int(1), "adapter pool page rank: an adapter of rank r takes "
         "ceil(r / it) pages; must divide --max-lora-rank (default: the LoRA backend's; triton pages, torch "
         "does not)"),
    Flag("adapter-metric-series", "lora.adapter_metric_series", _int(0), "adapters with series of their own on the "
         "per-adapter metrics (first come; the rest share adapter=\"(other)\"; each costs ~80 series)"),
    Flag("max-mixture-experts", "lora.max_mixture_experts", _int(1), "most adapters in one request's `adapters` "
         "mixture"),
    Flag("max-mixture-rank", "lora.max_mixture_rank", _int(1), "largest total rank of one mixture (an adapter whose "
         "rank is not known yet counts --max-lora-rank)"),
    Flag("max-route-experts", "lora.max_route_experts", _int(1), "most experts one `route` request chooses among "
         "(a route naming no experts uses every adapter the caller may use, within this limit)"),
    Flag("lora-dtype", "lora.lora_dtype", _choice("auto", "float32", "bfloat16"),
         "auto (float32 on CPU, the model dtype on GPU) | float32 | bfloat16"),
    Flag("lora-backend", "lora.lora_backend", _backend("lora"),
         "auto | torch | triton (auto: triton on CUDA, torch on CPU; chosen at start)"),
    Flag("allowed-adapter-roots", "lora.allowed_adapter_roots", _paths,
         "directories the admin API may load adapters from (besides --adapters-dir)", nargs="+"),
    Flag("no-lora", "lora.enabled", _bool, "serve the base model alone (no adapter slots)", switch=True,
         switch_value=False),
    Flag("host", "server.host", str, "address to bind"),
    Flag("port", "server.port", _int(0, 65535), "port to bind"),
    Flag("api-keys", "server.api_keys", _pairs, "KEY=TENANT ... tenants without limits (none and no --tenants: "
         "open)", nargs="+"),
    Flag("tenants", "server.tenants", str, "tenants file (TOML): key hashes, weights, quotas; see docs/operator.md"),
    Flag("admin-key", "server.admin_key", str, "bearer key of the admin API (adapter load/unload/pin)"),
    Flag("log-level", "server.log_level", _choice("debug", "info", "warning", "error", "critical"),
         "debug | info | warning | error | critical"),
    Flag("max-body-bytes", "server.max_body_bytes", _size,
         "largest request body: bytes or e.g. 8MiB (larger: HTTP 413)"),
    Flag("engine-process", "server.engine_process", _on_off,
         "on | off: run the engine core in its own process, requests and outputs over ZeroMQ; off: an engine "
         "thread in the server's process (one process: for tests and debugging)"),
    Flag("engine-heartbeat-timeout", "server.engine_heartbeat_timeout", _heartbeat_seconds,
         "with --engine-process on: seconds without a message from the engine core process (it sends one every "
         "second) before /health, /ready and new requests answer 503; serving resumes when it answers again"),
    Flag("engine-step-timeout", "server.engine_step_timeout", _seconds,
         "with --engine-process on: seconds one iteration of the engine loop (a step) may run before the engine "
         "counts as hung: /health, /ready and new requests answer 503 until the step completes (0: no limit; "
         "waiting for work never counts; raise it for large models on CPU, whose steps take minutes)"),
    Flag("shutdown-timeout", "server.shutdown_timeout", _seconds,
         "seconds in-flight requests get to finish after SIGTERM (new ones get 503); then they are aborted"),
]


def build_config(args: argparse.Namespace) -> Config:
    """Raises ValueError naming the setting at fault and where it came from (flag, variable, file)."""
    cfg = Config()
    file_values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a table of settings, got {type(raw).__name__}")
        file_values = {k.replace("_", "-"): v for k, v in raw.items()}
        # A misspelt key would otherwise leave its setting at the default without a word.
        unknown = sorted(set(file_values) - {f.name for f in FLAGS})
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)} (the keys are `loramux serve` flag "
                             "names, see --help)")
    for flag in FLAGS:
        value, source = file_values.get(flag.name, _UNSET), f"{flag.name} in {getattr(args, 'config', None)}"
        if flag.env in os.environ:
            value, source = os.environ[flag.env], f"{flag.env}={os.environ[flag.env]}"
        cli = getattr(args, flag.name.replace("-", "_"), None)
        if cli is not None:
            value, source = cli, f"--{flag.name}"
        if value is _UNSET:
            continue
        section, field = flag.path.split(".")
        try:
            if not flag.switch:
                converted = flag.convert(value)
            elif cli is None:  # a file's or variable's true means the flag given (the CLI's value is its const)
                converted = flag.switch_value if _on_off(value) else not flag.switch_value
            else:
                converted = value
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: {exc}") from None
        setattr(getattr(cfg, section), field, converted)
    return cfg


def _default(cfg: Config, flag: Flag) -> Any:
    section, field = flag.path.split(".")
    return getattr(getattr(cfg, section), field)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description="Serve many LoRA adapters over one base LLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server",
                           description="Every flag can also come from --config (TOML/JSON, same names) or from "
                                       "LORAMUX_<FLAG> environment variables.")
    serve.add_argument("--config", help="TOML or JSON file of settings (keys: the flag names)")
    defaults = Config()
    for flag in FLAGS:
        dest = flag.name.replace("-", "_")
        default = "off" if flag.switch else _default(defaults, flag)  # a switch is off unless given
        if flag.convert is _on_off:
            default = "on" if default else "off"
        text = f"{flag.help} [default: {default}; env {flag.env}]"
        if flag.switch:
            serve.add_argument(f"--{flag.name}", dest=dest, action="store_const", const=flag.switch_value,
                               default=None, help=text)
        else:
            serve.add_argument(f"--{flag.name}", dest=dest, default=None, nargs=flag.nargs, help=text)
    sub.add_parser("fetch-default-model", help="install and convert SmolLM2-135M-Instruct (once)")
    tenants = sub.add_parser("tenants", help="manage the tenants file").add_subparsers(dest="tenants_command",
                                                                                        required=True)
    add_key = tenants.add_parser("add-key", help="print a new API key for a tenant (once) and write its hash "
                                                 "into the tenants file (tenant and file created if absent)")
    add_key.add_argument("name", help="tenant name")
    add_key.add_argument("--file", required=True, help="the tenants file (TOML) the server reads with --tenants")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.command == "fetch-default-model":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from server.model.default_model import ensure_default_model

        print(ensure_default_model())
        return 0
    if args.command == "tenants":
        return tenants_add_key(args.name, args.file)
    try:
        cfg = build_config(args)
    except (ValueError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"loramux: bad configuration: {exc}", file=sys.stderr)
        return 2
    return serve(cfg)


def tenants_add_key(name: str, path: str) -> int:
    from server.tenants import TenantFileError
    from server.tenants.keys import add_key

    try:
        key = add_key(path, name)
    except (TenantFileError, OSError) as exc:
        print(f"loramux: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(f"added a key for tenant {name!r} to {path} (only its hash is stored: this is the one time the key "
          "is shown). A running server picks it up on SIGHUP or POST /v1/admin/reload_tenants.", file=sys.stderr)
    return 0


def serve(cfg: Config) -> int:
    """Serve until SIGTERM/SIGINT, then drain (server/api/shutdown.py) and return 0."""
    import uvicorn

    from server.api.app import create_app
    from server.api.shutdown import FLUSH_S, DrainingServer
    from server.tenants import TenantFileError

    logging.basicConfig(level=cfg.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(cfg)
    except TenantFileError as exc:
        print(f"loramux: bad tenants: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a configuration the engine cannot run (BackendError, pool sizes, page rank)
        logging.getLogger(__name__).debug("start-up failed", exc_info=True)
        print(f"loramux: {exc}", file=sys.stderr)
        return 2
    # The drain has already waited for the requests in flight; uvicorn's own graceful wait
    # only covers a connection still open after it (e.g. a client that stopped reading).
    config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port, log_level=cfg.server.log_level,
                            timeout_graceful_shutdown=FLUSH_S)
    DrainingServer(config, app.state.drain, app.state.service.engine).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
