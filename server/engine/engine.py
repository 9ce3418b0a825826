"""The synchronous engine: requests in, one `step()` at a time, outputs out.

It owns the scheduler, the runner and the output processor and is driven by exactly
one thread (`AsyncEngine`'s loop, or a test / benchmark calling `step()` directly).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import torch

from server.adapters.errors import AdapterError
from server.adapters.manager import AdapterManager
from server.adapters.registry import AdapterRef
from server.config import Config
from server.engine import cuda_graphs, memory_plan
from server.engine.backends import select_attention, select_lora
from server.engine.detokenizer import TextProcessor
from server.engine.device import resolve_device, resolve_dtype
from server.engine.engine_info import EngineInfo, validate_request
from server.engine.experts import dora_in_mixture, expert_param, experts_per_token, not_found
from server.engine.kv_cache import BlockAllocator
from server.engine.model_runner import KVCache, ModelRunner, StepResult
from server.engine.output_processor import OutputProcessor, RequestOutput, failed_output
from server.engine.policies import make_policy
from server.engine.request import FinishReason, GenerationRequest, InvalidRequestError, Mixture, Sequence, SeqStatus
from server.engine.sampler import NON_FINITE, Sampler
from server.engine.scheduler import ScheduledChunk, Scheduler
from server.metrics import EngineState, Metrics
from server.model.arch import ModelArch
from server.model.decoder import DecoderModel
from server.model.loading import base_linear_weight, load_weights
from server.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


NON_FINITE_LOGITS = "non_finite_logits"  # the error code of a request whose logits were NaN / inf
_NON_FINITE_MESSAGE = ("the model's scores for output token {} of this request were not finite numbers (NaN or "
                       "infinity): a numeric overflow, e.g. from very large mixture weights or adapter values; "
                       "the request cannot continue")


class LLMEngine:
    def __init__(self, config: Config, model_dir: str | Path, metrics: Metrics | None = None,
                 detokenize: bool = True):
        """`detokenize=False`: outputs carry token ids only (no text, no stop strings); the
        engine core process runs so, its server process running the text level."""
        self.config = config
        self.metrics = metrics or Metrics()
        mc, cc, sc = config.model, config.cache, config.scheduler
        if mc.num_threads:
            torch.set_num_threads(mc.num_threads)
        torch.manual_seed(mc.seed)
        device = resolve_device(mc.device)
        dtype = resolve_dtype(mc.dtype, device)
        model_dir = Path(model_dir)

        start_free = memory_plan.free_bytes(device)  # before this engine holds anything
        arch = ModelArch.from_dir(model_dir)
        per_block = KVCache.bytes_per_block(arch.num_layers, cc.block_size, arch.num_kv_heads, arch.head_dim, dtype)
        # None on CUDA without --kv-cache-memory: then the plan sizes it once the weights and the adapter pool are in
        num_blocks, max_len = memory_plan.fixed_blocks(config, device, per_block,
                                                       mc.max_model_len or arch.max_position_embeddings)
        # checked here, before any loading: a bad --cuda-graph-sizes fails on every device
        ladder = cuda_graphs.batch_ladder(sc.max_num_seqs, mc.cuda_graph_sizes)
        t0 = time.perf_counter()
        # may build the C++ kernel (~15 s, once per machine)
        attention = select_attention(mc.attention_backend, arch, device, dtype)
        lora_backend = select_lora(config.lora.lora_backend, device) if config.lora.enabled else None
        self.tokenizer = Tokenizer(model_dir)
        weights = load_weights(model_dir, arch, dtype, device)
        self.model = DecoderModel(arch, weights, max_positions=max_len)
        lc = config.lora
        self.adapters = AdapterManager(lc, arch, dtype, device, self.metrics, self._on_adapter_loaded,
                                       reserved_names=[mc.served_model_name or arch.name or model_dir.name],
                                       base_weight=functools.partial(base_linear_weight, weights, arch),
                                       page_rank=lora_backend.page_rank(lc.max_lora_rank, lc.lora_page_rank)) \
            if lc.enabled else None
        graphs_off = cuda_graphs.unavailable(device, attention, lora_backend, mc.enforce_eager)
        if num_blocks is None:
            num_blocks, max_len = memory_plan.planned_blocks(config, self.model, attention, per_block, max_len,
                                                             ladder if graphs_off is None else None, start_free)
        # with graphs, one block past the allocator's: the scratch block graph padding rows write to
        self.kv_cache = KVCache(arch.num_layers, num_blocks + (graphs_off is None), cc.block_size,
                                arch.num_kv_heads, arch.head_dim, dtype, device)
        graphs = cuda_graphs.build(graphs_off, self.model, self.kv_cache, attention, lora_backend,
                                   self.adapters.pool if self.adapters else None, ladder=ladder,
                                   max_model_len=max_len, scratch_block=num_blocks, capture=device.type == "cuda")
        self.runner = ModelRunner(self.model, self.kv_cache, Sampler(device, mc.seed), attention=attention,
                                  lora=lora_backend, graphs=graphs)
        self.allocator = BlockAllocator(num_blocks, cc.block_size, prefix_caching=cc.prefix_caching)
        self.scheduler = Scheduler(self.allocator, sc.max_num_seqs, sc.max_num_batched_tokens,
                                   max_loras=self.adapters.step_limit if self.adapters else 0,
                                   max_lora_pages=self.adapters.step_pages if self.adapters else None,
                                   residency=self.adapters, policy=make_policy(config),
                                   prefetch_window=sc.prefetch_window, max_wait_steps=sc.max_wait_steps)
        self.wake: Callable[[], None] | None = None  # set by the loop driving us; called from loader threads
        self.idle = True  # the last step had nothing it could run (e.g. all waiting on adapter loads)
        eos = arch.eos_token_ids or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ())
        self.outputs = OutputProcessor(eos, max_len)
        self.text = TextProcessor(self.tokenizer) if detokenize else None
        self._seqs: dict[str, Sequence] = {}
        # Async scheduling: the step launched last, whose tokens the host has not taken in yet.
        self.async_scheduling = sc.async_scheduling
        self._in_flight: StepResult | None = None
        self._tenants: set[str] | None = None  # the configured tenants, once the server has named them
        self._adapter_names: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # running, waiting: gauge labels
        self._adapters_published = -1  # the scheduler's adapters_version they were made at
        self.info = EngineInfo(
            model_name=mc.served_model_name or arch.name or model_dir.name, model_dir=model_dir, arch=arch,
            dtype=dtype, device=device, max_model_len=max_len, num_blocks=num_blocks, block_size=cc.block_size,
        )
        self.metrics.configure_engine(self.info.model_name, cc.block_size, num_blocks,
                                      self.adapters.step_capacity if self.adapters else None,
                                      config.lora.adapter_metric_series)
        log.info("loaded %s (%s, %s, %s) in %.1fs: %d KV blocks x %d tokens, max_model_len %d, %d threads",
                 self.info.model_name, arch.model_type, dtype, device, time.perf_counter() - t0, num_blocks,
                 cc.block_size, max_len, torch.get_num_threads())

    # --- requests ------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError for what can never run. Reads only immutable state, so
        the HTTP thread may call it to answer 400 before queueing."""
        validate_request(request, self.info, self.config.lora, self.adapters)

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request (engine thread only)."""
        self.validate(request)
        if request.request_id in self._seqs:
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}")
        if request.adapter is not None:
            # The request holds one version of its adapter until it finishes (see AdapterManager).
            try:
                request = replace(request, adapter=self.adapters.acquire(request.adapter))
            except AdapterError:
                raise not_found(request.adapter) from None
        if request.experts is not None:
            request = replace(request, experts=replace(request.experts, adapters=self._acquire_all(request)))
        seq = Sequence.from_request(request)
        self._seqs[request.request_id] = seq
        if self.text is not None:
            self.text.add(seq.request_id, request.prompt_token_ids, request.params)
        self.scheduler.add(seq)
        self.publish_gauges()

    def _acquire_all(self, request: GenerationRequest) -> tuple[AdapterRef, ...]:
        """Hold every expert's version for the request (all or none)."""
        held: list[AdapterRef] = []
        for i, ref in enumerate(request.experts.adapters):
            try:
                held.append(self.adapters.acquire(ref))
            except AdapterError:
                for got in held:
                    self.adapters.release(got)
                raise not_found(ref, expert_param(request, i)) from None
        self.metrics.on_experts_request(request.tenant, isinstance(request.experts, Mixture))
        return tuple(held)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
              kept: int | None = None) -> RequestOutput | None:
        """Retire a request now, counted as `reason` (another than "abort": the server process
        found its end, e.g. a stop string, after the core had sent the token). `kept`: the output
        tokens its client got, where the server process cut the rest (`Sequence.num_cut`)."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        if kept is not None:
            seq.num_cut = max(0, seq.num_output_tokens - kept)
        self._finish(seq, reason)
        self.publish_gauges()  # no step may follow (the last client left): gauges must not go stale
        return RequestOutput(request_id, finished=True, finish_reason=reason,
                             num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
                             num_cached_tokens=seq.num_cached_prompt_tokens)

    def set_tenant_weights(self, weights: dict[str, float]) -> None:
        """Fair-share weights by tenant name, every configured tenant listed (engine thread only;
        a tenant not listed weighs 1). Counters of tenants that are gone and idle are dropped, with
        their metric series; if a tenant is gone, so is the prefix cache (a tenant is its name in
        the cache's namespace, and the name may come back for someone else)."""
        if self._tenants is not None and self._tenants - weights.keys():
            self.allocator.forget_cached()
        self._tenants = set(weights)
        policy = self.scheduler.policy
        before = set(policy.counters())
        policy.set_weights(weights)
        for tenant in before - set(policy.counters()):
            try:
                self.metrics.tenant_vtc.remove(tenant)
            except KeyError:  # never published
                pass
        self.publish_gauges()

    def publish_gauges(self) -> None:
        """Hand the metrics our state; after every change of it (no tensor work; O(distinct
        adapters) when the running or waiting adapters changed, else O(tenants))."""
        sched = self.scheduler
        if sched.adapters_version != self._adapters_published:
            # A mixture's or route's experts count as its adapters here (which adapters this pod
            # runs or will load); its per-request metric labels use the base's "" (_label).
            # Names as clients call them (a tenant's own adapter too: `model` is its bare name),
            # which is what a router's LoRA affinity matches.
            self._adapter_names = tuple(tuple(sorted({a.name for a in sched.adapters_of(status)}))
                                        for status in (SeqStatus.RUNNING, SeqStatus.WAITING))
            self._adapters_published = sched.adapters_version
        self.metrics.publish(EngineState(running=sched.num_running, waiting=sched.num_waiting,
                                         kv_blocks_used=self.allocator.num_used,
                                         running_adapters=self._adapter_names[0],
                                         waiting_adapters=self._adapter_names[1]))
        for tenant, value in self.scheduler.policy.counters().items():
            self.metrics.tenant_vtc.labels(tenant).set(value)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    @property
    def num_unfinished(self) -> int:
        return len(self._seqs)

    # --- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then take in the tokens of the step before it (async
        scheduling: the device runs step N+1 while the host turns step N's tokens into outputs and
        schedules N+2) or of this one (synchronous). Outputs of every step taken in."""
        t0 = time.perf_counter()
        outputs = self._poll_adapters() if self.adapters else []
        had_in_flight = self._in_flight is not None
        sched = self.scheduler.schedule()
        if sched.preempted:
            self.metrics.on_preempted(len(sched.preempted))
        if sched.prefix_queried:
            self.metrics.on_prefix_cache(sched.prefix_queried, sched.prefix_hits)
        now = time.monotonic()
        for chunk in sched.chunks:
            seq = chunk.seq
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                self.metrics.on_scheduled(seq.request.tenant, now - seq.request.arrival_time)
        self.publish_gauges()  # admissions and preemptions show now, not after the model step
        self.idle = sched.is_empty and not had_in_flight
        launched = None
        if not sched.is_empty:
            launched, failed = self._launch(sched.chunks)
            outputs += failed
        if self._in_flight is not None:
            outputs += self._take(self._take_in_flight(), then=launched.seqs if launched is not None else ())
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs += self._take(launched)
        if not sched.is_empty:
            self.metrics.step_time.observe(time.perf_counter() - t0)
            self.metrics.step_tokens.observe(sched.num_tokens)
        self.publish_gauges()
        return outputs

    def _launch(self, chunks: list[ScheduledChunk]) -> tuple[StepResult | None, list[RequestOutput]]:
        """Queue `chunks` on the device, reading pending tokens from the step in flight. If that
        raises, take the step in flight in, then run each half on its own, synchronously, so a
        failure (a bug a request's data triggers) fails only the sequences that cause it and the
        rest of the step still gets its tokens; the failing path costs O(k log B) passes.
        -> (the launched step, or None when it failed and ran apart; outputs of what ran apart)."""
        names = {a for c in chunks for a in c.seq.adapters}
        try:
            lora = self.adapters.activate(names) if names else None
            result = self.runner.execute(chunks, lora, self._in_flight)
        except Exception as exc:
            # Their tokens were charged when scheduled (the policy gives back those pending when a
            # request ends): pending until run apart, so one that ends first pays for none of them.
            sampling = [c.seq for c in chunks if c.samples]
            for seq in sampling:
                seq.num_pending += 1
            outputs = self._take(self._take_in_flight(), then=[c.seq for c in chunks]) \
                if self._in_flight is not None else []
            for seq in sampling:
                seq.num_pending -= 1
            chunks = [c for c in chunks if not c.seq.is_finished]
            if len(chunks) > 1:
                mid = len(chunks) // 2
                for half in (chunks[:mid], chunks[mid:]):
                    launched, failed = self._launch(half)
                    outputs += failed + (self._take(launched) if launched is not None else [])
            elif chunks:
                log.exception("request %s failed inside an engine step", chunks[0].seq.request_id)
                chunks[0].seq.num_pending += chunks[0].samples  # retired with its charged token never made
                outputs.append(self._fail(chunks[0].seq, exc))
            return None, outputs
        self.metrics.step_adapters.observe(len(names))
        self.metrics.on_lora_tokens(experts_per_token(chunks))
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            if chunk.samples:
                chunk.seq.num_pending += 1
            self.allocator.cache_computed(chunk.seq)
        return result, []

    def _take_in_flight(self) -> StepResult:
        result, self._in_flight = self._in_flight, None
        return result

    def _take(self, result: StepResult, then: Iterable[Sequence] = ()) -> list[RequestOutput]:
        """Wait for `result`'s tokens and apply them: each sequence's token, its output, its end.
        A sequence that ended while the step ran (aborted, or stopped by the step before) drops
        its token. `then`: the sequences of the step launched (or launching) after `result` (async),
        which read its tokens and K/V."""
        if result.tokens is None:
            return []
        try:
            sampled = result.tokens.output()
        except Exception as exc:  # an error the device reports only now: the step is lost
            log.exception("an engine step failed while its tokens were read back")
            self.allocator.forget_cached()  # the blocks its launch registered may hold no K/V
            # Its K/V may be missing: every request it wrote for ends, and every one the step
            # after it ran (that step continued its prompts and admitted others onto the blocks
            # it registered); retired with the step's tokens still pending, which the policy gives back.
            lost = [*result.seqs, *then]
            failed = [self._fail(seq, exc) for seq in lost if not seq.is_finished]
            for seq in result.sampled:
                seq.num_pending -= 1
            return failed
        outputs = []
        given: Counter[str] = Counter()  # tokens appended, per tenant
        now = time.monotonic()
        for seq, token, logprobs in zip(result.sampled, sampled.token_ids, sampled.logprobs):
            if token == NON_FINITE and not seq.is_finished:  # its logits held a NaN / inf: this request alone ends
                log.warning("request %s: logits not finite after %d output tokens", seq.request_id,
                            seq.num_output_tokens)
                # retired with this token still pending: never delivered, so the policy gives it back
                outputs.append(self._refuse(seq, _NON_FINITE_MESSAGE.format(seq.num_output_tokens + 1),
                                            NON_FINITE_LOGITS))
            seq.num_pending -= 1
            if seq.is_finished:
                continue
            seq.token_ids.append(token)
            given[seq.request.tenant] += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.metrics.on_first_token(seq.request.tenant, _label(seq.adapter), seq.num_prompt_tokens,
                                            now - seq.request.arrival_time)
            try:
                out = self.outputs.on_token(seq, token, logprobs)
                if self.text is not None:
                    self.text.process(out)
            except Exception as exc:  # detokenizing / stop matching: this sequence alone
                log.exception("request %s failed while processing its output", seq.request_id)
                outputs.append(self._fail(seq, exc))
                continue
            if out.finished:
                self._finish(seq, out.finish_reason)
            outputs.append(out)
        self.metrics.on_generated(given)
        return outputs

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """Retire `seq` with an error."""
        self._finish(seq, FinishReason.ERROR)
        return failed_output(seq.request_id, exc, seq.num_prompt_tokens, seq.num_output_tokens)

    def _poll_adapters(self) -> list[RequestOutput]:
        """Take in finished adapter loads; fail the requests whose adapter could not load, and the
        waiting mixtures and routes a load showed to have a DoRA expert."""
        failed = self.adapters.poll(self.scheduler.adapters_in_use)
        outputs = []
        for seq in list(self._seqs.values()):
            bad = next((a for a in seq.adapters if a in failed), None)
            if bad is not None:
                error = failed[bad]
                outputs.append(self._refuse(seq, str(error), error.code))
            elif seq.experts is not None and seq.status is SeqStatus.WAITING:
                dora = next((a for a in seq.adapters if self.adapters.is_dora(a)), None)
                if dora is not None:
                    outputs.append(self._refuse(seq, str(dora_in_mixture(dora, None)), "adapter_unsupported"))
        return outputs

    def _refuse(self, seq: Sequence, error: str, code: str) -> RequestOutput:
        """Retire `seq` with an error its client may read in full (`code`: machine-readable)."""
        self._finish(seq, FinishReason.ERROR)
        return RequestOutput(seq.request_id, finished=True, finish_reason=FinishReason.ERROR,
                             num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
                             error=error, error_code=code)

    def _on_adapter_loaded(self) -> None:
        if self.wake is not None:
            self.wake()

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        if self.text is not None:
            self.text.remove(seq.request_id)
        del self._seqs[seq.request_id]
        now = time.monotonic()
        tpot = None
        if seq.first_token_time is not None and seq.num_output_tokens > 1:
            tpot = (now - seq.first_token_time) / (seq.num_output_tokens - 1)
        self.metrics.on_finish(seq.request.tenant, _label(seq.adapter), reason.value, seq.num_prompt_tokens,
                               now - seq.request.arrival_time, tpot)
        # after on_finish: the last release of an unloaded adapter forgets its series, which
        # counting this request under its label would otherwise bring back for good
        for ref in seq.adapters:
            self.adapters.release(ref)


def _label(adapter: AdapterRef | None) -> str:
    """An adapter's metric label: its name, `tenant/name` for a tenant's own, "" for the base."""
    return "" if adapter is None else str(adapter)
