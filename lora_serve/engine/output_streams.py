"""Where AsyncEngine delivers each request's outputs: one asyncio queue per request id, on the event
loop of the caller that submitted it. The engine thread delivers (`deliver`, thread-safe through
`call_soon_threadsafe`); callers open and close their request ids. An output for a request id no
longer open (its caller stopped iterating) is dropped.
"""

from __future__ import annotations

import asyncio
import threading

from .outputs import RequestOutput


class OutputStreams:
    def __init__(self) -> None:
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._lock = threading.Lock()

    def open(self, request_ids: list[str]) -> asyncio.Queue[RequestOutput]:
        """One queue for all of `request_ids`, on the running event loop; ValueError if one is already open."""
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._lock:
            taken = next((i for i in request_ids if i in self._streams), None)
            if taken is not None:
                raise ValueError(f"request id {taken!r} is already running")
            for request_id in request_ids:
                self._streams[request_id] = (asyncio.get_running_loop(), stream)
        return stream

    def close(self, request_ids: list[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._streams.pop(request_id, None)

    def deliver(self, out: RequestOutput) -> None:
        with self._lock:
            target = self._streams.get(out.request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, out)

    def fail_all(self, message: str) -> None:
        """An error output to every open request (the engine loop died)."""
        with self._lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self.deliver(RequestOutput(request_id, [], "", [], 0, 0, "error", message))
