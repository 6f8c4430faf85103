"""An ASGI middleware that logs one JSON line per request to the `lora_serve.access` logger.

    {"method": "POST", "path": "/v1/chat/completions", "status": 200, "duration_ms": 41.2,
     "model": "sql", "adapter": "sql", "prompt_tokens": 12, "completion_tokens": 30}

The line is written when the response ends (for a stream, after [DONE]), so durations and
token counts are whole. Routes put model, adapter and usage on `request.state` (scope["state"]);
headers, query strings and bodies are never logged, so neither keys nor prompts reach the log.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("lora_serve.access")


class AccessLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # the dict request.state writes into
        start = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            log.info(json.dumps(access_record(scope, status, time.perf_counter() - start)))


def access_record(scope: Scope, status: int, duration_s: float) -> dict:
    state = scope.get("state", {})
    record = {
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "duration_ms": round(duration_s * 1000, 1),
    }
    if "model" in state:
        record["model"], record["adapter"] = state["model"], state["adapter"]
    if "usage" in state:
        record["prompt_tokens"], record["completion_tokens"] = state["usage"]
    return record
