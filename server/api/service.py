"""What the HTTP routes need from the rest of the server, in one object on `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

from server.adapters.errors import EXISTS, FORBIDDEN, NOT_FOUND, QUOTA, AdapterError
from server.adapters.manager import AdapterManager
from server.adapters.registry import AdapterEntry, AdapterRef
from server.api.errors import APIError, bad_request, model_not_found
from server.api.response_schemas import ModelCard
from server.engine.client import EngineClient
from server.engine.request import Mixture, Route
from server.model.tokenizer import Tokenizer

_ADAPTER_STATUS = {NOT_FOUND: 404, FORBIDDEN: 403, QUOTA: 403, EXISTS: 409}


def adapter_error(exc: AdapterError, param: str | None = None) -> APIError:
    """AdapterError -> OpenAI error: unknown 404, forbidden path / over quota 403, name taken 409, else 400.
    `param`: the request field at fault, if one is."""
    return APIError(_ADAPTER_STATUS.get(exc.code, 400), str(exc), param=param, code=exc.code)


@dataclass
class Service:
    engine: EngineClient
    tokenizer: Tokenizer
    base_model: str
    max_model_len: int
    adapters: AdapterManager | None = None

    def resolve_model(self, model: str, adapter_id: str | None, tenant: str) -> AdapterRef | None:
        """The adapter version a request runs with (None: the base), or a 404.

        `model` names the base or an adapter (as in vLLM); or `adapter_id` names the adapter
        with `model` = the base. A tenant sees its own adapters, then the shared ones; another
        tenant's adapter answers exactly as one that does not exist."""
        if adapter_id is not None:  # "" too: a name no adapter has, not "no adapter"
            if model != self.base_model:  # as with `adapters` / `route`: not a 404 for an existing `model`
                raise bad_request(f"with `adapter_id`, `model` must be the base model `{self.base_model}`", "model")
            name, param = adapter_id, "adapter_id"
        elif model == self.base_model:
            return None
        else:
            name, param = model, "model"
        ref = self.adapters.lookup(tenant, name) if self.adapters is not None else None
        if ref is None:
            err = model_not_found(name)
            err.param = param
            raise err
        return ref

    def resolve_choice(self, body, tenant: str) -> AdapterRef | Mixture | Route | None:
        """What a completions / chat body runs with: the base (None), one adapter version, or a
        mixture / route over adapter versions `tenant` may use. Unknown (or another tenant's)
        names are 404s naming the field; limits, ranks and DoRA are the engine's checks
        (LLMEngine.validate), made when the request is validated."""
        given = [name for name in ("adapter_id", "adapters", "route") if getattr(body, name) is not None]
        if len(given) > 1:
            raise bad_request(f"{' and '.join(given)} exclude each other: give at most one", given[1])
        if body.adapters is None and body.route is None:
            return self.resolve_model(body.model, body.adapter_id, tenant)
        field = given[0]
        if body.model != self.base_model:
            raise bad_request(f"with `{field}`, `model` must be the base model `{self.base_model}`", "model")
        if body.adapters is not None:
            names = [a.id for a in body.adapters]
            refs = self._experts(names, tenant, lambda i: f"adapters.{i}.id")
            return Mixture(refs, tuple(a.weight for a in body.adapters))
        route = body.route
        if route.experts is not None:
            refs = self._experts(route.experts, tenant, lambda i: f"route.experts.{i}")
        else:
            refs = self._library(tenant)
        if route.top_k > len(refs):
            raise bad_request(f"route.top_k must be at most the number of experts ({len(refs)}), got {route.top_k}",
                              "route.top_k")
        return Route(refs, route.top_k, route.temperature)

    def _experts(self, names: list[str], tenant: str, param) -> tuple[AdapterRef, ...]:
        """Each named adapter's version as `tenant` sees it; a duplicate is a 400, an unknown one a 404."""
        refs, seen = [], set()
        for i, name in enumerate(names):
            if name in seen:
                raise bad_request(f"adapter `{name}` is named twice", param(i), "duplicate_adapter")
            seen.add(name)
            ref = self.adapters.lookup(tenant, name) if self.adapters is not None else None
            if ref is None:
                err = model_not_found(name)
                err.param = param(i)
                raise err
            refs.append(ref)
        return tuple(refs)

    def _library(self, tenant: str) -> tuple[AdapterRef, ...]:
        """A route naming no experts: every adapter `tenant` may use, within --max-route-experts,
        but those known to be DoRA (they run alone; one not read yet fails the request if its load
        shows it is DoRA)."""
        entries = self.adapters.visible(tenant) if self.adapters is not None else []
        refs = tuple(e.ref for e in entries if not e.summary.use_dora)
        if not refs:
            raise bad_request("route.experts omitted, and there is no adapter to route among", "route.experts")
        limit = self.engine.config.lora.max_route_experts
        if len(refs) > limit:
            raise bad_request(f"route.experts omitted means every adapter you may use ({len(refs)}), more than "
                              f"this server routes among (--max-route-experts {limit}); name the experts in "
                              "route.experts", "route.experts", "too_many_experts")
        return refs

    def model_cards(self, tenant: str) -> list[ModelCard]:
        """The base and every adapter `tenant` may use (never a filesystem path)."""
        cards = [ModelCard(id=self.base_model, root=self.base_model, max_model_len=self.max_model_len,
                           family=self.engine.info.arch.family.name)]
        if self.adapters is not None:
            cards += [adapter_card(e, self.base_model, self.adapters) for e in self.adapters.visible(tenant)]
        return cards

    def check_capacity(self, num_requests: int) -> None:
        """503 (with Retry-After) when the engine's queue is full now; 400 when this request alone
        could never fit it. The bound is `--max-waiting` (see config.SchedulerConfig)."""
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        if num_requests > self.engine.max_pending:
            raise APIError(400, f"the request asks for {num_requests} generations (prompts x n); this server "
                                f"queues at most {self.engine.max_pending}", param="n", code="too_many_generations")
        if self.engine.num_pending + num_requests > self.engine.max_pending:
            raise overloaded(f"server overloaded ({self.engine.num_pending} requests pending); retry later")


OVERLOAD_RETRY_AFTER_S = 1  # a full queue drains in about one generation time; clients back off on their own


def overloaded(message: str) -> APIError:
    """Server full: 503 at once, never a long wait in a queue."""
    return APIError(503, message, code="overloaded", headers={"Retry-After": str(OVERLOAD_RETRY_AFTER_S)})


def adapter_card(entry: AdapterEntry, base_model: str, manager: AdapterManager) -> ModelCard:
    """An adapter's card; `root` is its id (never a server filesystem path); `owned_by` its
    tenant, or "loramux" for a shared adapter. `dora`: a DoRA adapter (null: not read yet);
    `routing_ready`: its routing prototypes are computed (it is in the host cache), so a route
    over it starts without a load."""
    s = entry.summary
    return ModelCard(id=entry.name, root=entry.name, parent=base_model, owned_by=entry.owner or "loramux",
                     shared=entry.owner is None, rank=s.rank,
                     target_modules=list(s.target_modules) if s.target_modules is not None else None,
                     size_bytes=s.file_bytes, num_params=s.num_params, source=entry.source, pinned=entry.pinned,
                     dora=s.use_dora,
                     routing_ready=manager.residency(entry.ref)[0])
