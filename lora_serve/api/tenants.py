"""Who a request is: API keys mapped to a tenant and a role, and what each may see.

    --auth-file keys.json   {"keys": [{"key": "sk-acme-1", "tenant": "acme", "role": "user"},
                                      {"key": "sk-ops", "tenant": "ops", "role": "admin"}]}
    (or the same as TOML: [[keys]] tables with key, tenant, role)

An adapter uploaded with a tenant's key belongs to that tenant: only that tenant and admins
see it or run it; to everyone else it does not exist (the same 404 as an unknown name).
Adapters from --adapter-dir, --lora-modules or the load API belong to no tenant: all see them.
Server paths (an adapter's folder, the base model's) are shown in full to admins only.
Keys are compared in constant time, every key every time, and never logged.
"""

from __future__ import annotations

import hmac
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None: no tenant (the --api-key user, or an admin)
    is_admin: bool

    def can_see(self, owner: str | None) -> bool:
        return owner is None or self.is_admin or owner == self.tenant

    def shown_path(self, path: Path | str) -> str:
        """A server path as this caller may see it: in full for admins, else only its last part
        (where the server keeps its files is not a user's business)."""
        return str(path) if self.is_admin else Path(path).name


OPEN = Principal(tenant=None, is_admin=True)  # no key configured: everything is visible, as before tenants


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=8)
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    role: Literal["admin", "user"] = "user"


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyEntry] = Field(min_length=1)

    @field_validator("keys")
    @classmethod
    def _unique(cls, keys: list[KeyEntry]) -> list[KeyEntry]:
        if len({k.key for k in keys}) != len(keys):
            raise ValueError("a key appears twice")
        return keys


def _load_toml(text: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads(text)
    raise ValueError("TOML key files need Python 3.11; use JSON")  # Python 3.10 has no tomllib


class KeyTable:
    def __init__(self, entries: list[KeyEntry]):
        self._entries = [(e.key.encode(), Principal(e.tenant, e.role == "admin")) for e in entries]

    @classmethod
    def load(cls, path: Path) -> KeyTable:
        """Parse a JSON or TOML (by suffix) key file; ValueError naming the file on any problem (never a key)."""
        try:
            text = Path(path).read_text()
            data = _load_toml(text) if Path(path).suffix == ".toml" else json.loads(text)
            return cls(KeyFile.model_validate(data).keys)
        except (OSError, ValueError, ValidationError) as exc:
            reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else type(exc).__name__
            raise ValueError(f"auth_file {path}: {reason}") from None

    def identify(self, token: str) -> Principal | None:
        given = token.encode()
        found = None
        for key, principal in self._entries:  # no early exit: the time does not tell which key matched
            if hmac.compare_digest(given, key):
                found = principal
        return found
