"""The base of every request body: unknown fields refused, null read as the field's default."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        # Many clients send every field, unset ones as null ("temperature": null); OpenAI reads that as the default.
        assert info.field_name is not None  # always set for a field validator
        field = cls.model_fields[info.field_name]
        if value is None and not field.is_required():
            return field.get_default(call_default_factory=True)
        return value
