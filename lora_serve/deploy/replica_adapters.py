"""What a Ray replica asks of its engine's adapter catalog (`engine.adapters`), in one place.

Ray's multiplexer decides which adapters a replica holds (ray_replica.py), so a replica starts
with none from --adapter-dir, registers one when a request naming it is placed there, and
unregisters it when the multiplexer's LRU drops it. Only adapters whose folder is in the shared
--adapter-dir are dropped that way (a request naming one registers it again from that folder);
--lora-modules and the load API's adapters stay, and so does a merged one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_serve.lora.errors import AdapterError

if TYPE_CHECKING:
    from lora_serve.engine.async_engine import AsyncEngine

STORED = ("adapter-dir", "upload")  # origins of the adapters whose folder is in --adapter-dir


class ReplicaAdapters:
    def __init__(self, engine: AsyncEngine):
        self.catalog = engine.adapters

    def drop_stored(self) -> None:
        """Unregister what the engine's start-up scan registered from --adapter-dir (it validated each once)."""
        for record in self.catalog.list():
            if record.origin in STORED and record.name != self.catalog.merged_name:
                self.catalog.unregister(record.name, record)

    def register(self, name: str) -> bool:
        """Registered already, or now from --adapter-dir/<name>; False for a name that is neither. Blocking I/O."""
        return self.catalog.resolve_from_adapter_dir(name)

    def unregister(self, name: str) -> None:
        """Unregister a stored adapter (requests running on it finish first); anything else stays."""
        try:
            record = self.catalog.get(name)
            if record.origin in STORED:
                self.catalog.unregister(name, record)
        except AdapterError:  # gone meanwhile, or merged (part of the base weights now: it stays)
            pass
