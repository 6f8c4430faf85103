"""Model names the API accepts, and `GET /v1/models`.

Today only the base model resolves; adapters (vLLM-style names and `BASE:ADAPTER`)
extend `ModelRegistry.resolve` without touching the routes.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from pathlib import Path

from pydantic import BaseModel

from lora_serve.api.errors import APIError


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "lora-serve"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ModelRegistry:
    def __init__(self, base_name: str, model_path: Path, max_model_len: int) -> None:
        self.base_name = base_name
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.created = int(time.time())

    def resolve(self, name: str | None) -> str | None:
        """The lora_name a request's `model` field selects (None: the base model); 404 if unknown."""
        if name is None or name == self.base_name:
            return None
        raise APIError(
            HTTPStatus.NOT_FOUND,
            f"The model `{name}` does not exist.",
            param="model",
            code="model_not_found",
        )

    def model_list(self) -> ModelList:
        base = ModelCard(
            id=self.base_name, created=self.created, root=str(self.model_path), max_model_len=self.max_model_len
        )
        return ModelList(data=[base])
