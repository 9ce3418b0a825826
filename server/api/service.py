"""What the HTTP routes need from the rest of the server, in one object on `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

from server.api.errors import APIError, model_not_found
from server.api.schemas import ModelCard
from server.engine.async_engine import AsyncEngine
from server.model.tokenizer import Tokenizer


@dataclass
class Service:
    engine: AsyncEngine
    tokenizer: Tokenizer
    base_model: str
    max_model_len: int

    def resolve_model(self, model: str, adapter_id: str | None, tenant: str) -> str | None:
        """The adapter a request runs with (None: the base), or a 404."""
        if adapter_id:
            if model != self.base_model:
                raise model_not_found(model)
            raise model_not_found(adapter_id)
        if model == self.base_model:
            return None
        raise model_not_found(model)

    def model_cards(self, tenant: str) -> list[ModelCard]:
        return [ModelCard(id=self.base_model, root=self.base_model, max_model_len=self.max_model_len)]

    def check_capacity(self, num_requests: int) -> None:
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        if self.engine.num_pending + num_requests > self.engine.max_pending:
            raise APIError(503, f"server overloaded ({self.engine.num_pending} requests pending); retry later",
                           code="overloaded")
