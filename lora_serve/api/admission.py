"""Admission control for generation requests: a bounded wait queue and a per-request deadline.

    admission = Admission(max_queue=256, retry_after_s=1, timeout_s=600)
    with admission.admit(engine.num_running()):   # 429 + Retry-After when the queue is full
        ...                                        # remaining() bounds each wait on the engine

"Waiting" is every admitted request that is not in the engine's running batch: queued in
the scheduler, acquiring its adapter, or not yet seen by the engine thread. Counting here
rather than in the scheduler makes a burst that arrives within one engine step count at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus

from lora_serve.api.errors import SERVER_ERROR, APIError

RATE_LIMIT = "rate_limit_error"  # OpenAI's type for 429s


class Admission:
    def __init__(self, max_queue: int, retry_after_s: int, timeout_s: float | None):
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.timeout_s = timeout_s
        self.num_in_flight = 0  # touched only on the event loop thread

    @contextmanager
    def admit(self, num_running: int, num_seqs: int = 1) -> Iterator[Deadline]:
        """num_seqs: the engine sequences the request runs (its choices); they count as that many requests.
        A request is admitted while the queue is not full, however many it brings, so none waits forever."""
        if self.num_in_flight - num_running >= self.max_queue:
            raise APIError(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"the server's queue is full ({self.max_queue} waiting requests); retry later",
                RATE_LIMIT,
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.num_in_flight += num_seqs
        try:
            yield Deadline(self.timeout_s)
        finally:
            self.num_in_flight -= num_seqs


class Deadline:
    """When a request must be done; `remaining()` is None without a timeout."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self.at is None else max(self.at - time.monotonic(), 0.0)

    def expired(self) -> APIError:
        return APIError(
            HTTPStatus.GATEWAY_TIMEOUT,
            f"the request did not finish within the server's request_timeout_s ({self.timeout_s} s) and was aborted",
            SERVER_ERROR,
            code="request_timeout",
        )
