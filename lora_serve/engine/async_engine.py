"""Runs the engine loop on a background thread and serves requests to asyncio callers.

The HTTP layer calls only this class:

    engine = AsyncEngine.from_config(EngineConfig(...))
    async for out in engine.generate(request_id, prompt_token_ids, SamplingParams(...), lora_name=None):
        ...  # out is a RequestOutput delta; the last one has finish_reason set
    engine.generate_many([(request_id, prompt_token_ids, params), ...], lora_name)  # added together, deltas interleaved
    engine.abort(request_id)        # also happens when the consumer stops iterating
    engine.adapters                 # the adapter catalog (lora/catalog.py): register, look up, list
    await engine.run_blocking(engine.adapters.register_from, name, location, origin)   # on an adapter thread
    await engine.merge_adapter(name), await engine.remove_adapter(record), ...   # on the engine thread
    engine.num_running(), engine.num_waiting(), engine.is_healthy, engine.shutdown()
    engine.tokenizer, engine.model_path, engine.max_model_len

Torch releases the GIL inside its kernels, so the event loop stays responsive while
a step runs. The engine thread owns the CPU threads of torch ops (intra_op.py): the model loads
on a thread that ends, and other threads run torch ops on one thread. Requests and aborts reach
the loop thread through a queue and are applied between steps; outputs go back through
`call_soon_threadsafe` (output_streams.py). Adapters are read on threads of their own
(adapter_threads.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from ..config import EngineConfig
from ..lora.catalog import AdapterCatalog, AdapterLease
from ..lora.composition import ComposedLeases, Composition
from ..lora.registry import AdapterRecord
from ..model.default_model import resolve_model_path
from .adapter_threads import AdapterThreads
from .grammar import GrammarCompiler
from .intra_op import claim_intra_op_threads, run_on_own_thread
from .llm_engine import LLMEngine
from .output_streams import OutputStreams
from .outputs import RequestOutput
from .sampling_params import SamplingParams

EngineRequest = tuple[str, list[int], SamplingParams]  # request id, prompt token ids, sampling
T = TypeVar("T")

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams = OutputStreams()
        self._pending: dict[str, tuple[str, ...]] = {}  # submitted, not yet added by the loop: request id -> its adapters
        self._error: BaseException | None = None
        self._adapter_threads = AdapterThreads(engine.adapters)
        self._thread = threading.Thread(target=self._loop, args=(engine.num_threads,), name="lora-serve-engine", daemon=True)
        self._claimed = threading.Event()
        self._thread.start()
        self._claimed.wait()  # threads that first use torch from here on run its ops serially

    @classmethod
    def from_config(cls, config: EngineConfig, base_name: str | None = None) -> AsyncEngine:
        """base_name: the base model's id in the API (default: the model directory's name). Loads on a
        thread of its own, whose OpenMP workers end with it (intra_op.py)."""

        def load() -> LLMEngine:  # the first start converts the embedded model's GGUF, with torch ops too
            return LLMEngine.from_config(config, resolve_model_path(config.model.model), base_name)

        return cls(run_on_own_thread(load, "lora-serve-load"))

    # --- what the API reads ---------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def grammar_compiler(self) -> GrammarCompiler | None:
        """Thread-safe and blocking: the API compiles a request's grammar with it on a worker thread."""
        return self.engine.grammar_compiler

    @property
    def model_path(self):
        return self.engine.model_path

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def base_name(self) -> str:
        return self.engine.base_name

    @property
    def adapters(self) -> AdapterCatalog:
        """The adapter catalog: names, sources, CPU copies; its methods are thread-safe."""
        return self.engine.adapters

    @property
    def device(self) -> str:
        return str(self.engine.device)

    @property
    def dtype(self) -> str:
        return str(self.engine.dtype).removeprefix("torch.")

    @property
    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def num_running(self) -> int:
        return self.engine.num_running()

    def num_waiting(self) -> int:
        """Requests not running yet: in the scheduler's queue, or submitted and not yet seen by the loop."""
        return self.engine.num_waiting() + len(self._pending)

    def adapters_in_flight(self) -> tuple[set[str], set[str]]:
        """Adapter names of running and of waiting requests (for metrics and routing)."""
        running, waiting = self.engine.adapters_in_flight()
        return running, waiting | {name for names in list(self._pending.values()) for name in names}

    # --- requests -------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora_name: str | Composition | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream output deltas. Raises at once for a request that can never run: ValueError,
        or lora.errors.AdapterError (unknown or unreadable adapter)."""
        async with aclosing(self.generate_many([(request_id, prompt_token_ids, params)], lora_name)) as outputs:
            async for out in outputs:
                yield out

    async def generate_many(
        self, requests: list[EngineRequest], lora_name: str | Composition | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the deltas of several requests on one model (the choices of one API request: its prompts,
        n of each), interleaved as they come; tell them apart by request_id. lora_name: an adapter, or a
        weighted composition of adapters (lora/composition.py). They reach the engine in one
        command, so they are queued together and share steps. Ends when all have finished; closed before,
        it aborts the rest. Raises at once, adding none, if one can never run (as generate)."""
        for _, prompt_token_ids, params in requests:
            self.engine.check_request(prompt_token_ids, params)
        if isinstance(lora_name, Composition):
            self.engine.check_composition(lora_name)
        if not self.is_healthy:
            raise RuntimeError("the engine is not running")
        ids = [request_id for request_id, _, _ in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("the request ids of one call must differ")
        stream = self._streams.open(ids)
        if isinstance(lora_name, Composition):
            lora_name = lora_name.plain_name or lora_name  # one adapter at weight 1.0 is that adapter
        leases: list[AdapterLease | ComposedLeases | None] = [None] * len(requests)
        try:  # disk -> CPU here, on a worker thread, never on the engine loop; one lease per request, closed as it ends
            if isinstance(lora_name, Composition):
                for i in range(len(requests)):
                    leases[i] = await self.open_composed(lora_name)
            elif lora_name is not None:
                for i in range(len(requests)):
                    leases[i] = await self.open_adapter(lora_name)
        except BaseException:
            for lease in leases:
                if lease is not None:
                    lease.close()
            self._streams.close(ids)
            raise
        # The leases are the engine's from here: add_request closes one if it refuses its request.
        names = lora_name.names if isinstance(lora_name, Composition) else (lora_name,) if lora_name else ()
        for request_id in ids:
            self._pending[request_id] = names

        def add_all() -> None:
            for (request_id, prompt_token_ids, params), lease in zip(requests, leases):
                self._add(request_id, prompt_token_ids, params, lease)

        self._submit(add_all)
        unfinished = set(ids)
        try:
            while unfinished:
                out = await stream.get()
                if out.finished:
                    unfinished.discard(out.request_id)
                yield out
        finally:
            self._streams.close(ids)
            for request_id in unfinished:
                self.abort(request_id)

    async def open_composed(self, composition: Composition) -> ComposedLeases:
        """A lease on each of the composition's adapters, as open_adapter; those opened are closed if one fails."""
        return await self._adapter_threads.open_composed(composition)

    async def open_adapter(self, lora_name: str) -> AdapterLease:
        """A lease on the adapter from an acquire thread, waiting as long as it takes for a CPU place; given
        up when cancelled, closing a lease the thread got anyway (AdapterThreads.open)."""
        return await self._adapter_threads.open(lora_name)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on an adapter thread (registering, resolving, reading adapters): off the event loop and the
        engine thread, its torch ops on one thread (intra_op.use_one_thread)."""
        return await self._adapter_threads.run(fn, *args)

    async def merge_adapter(self, name: str, describe: Callable[[], Any] = lambda: None) -> Any:
        """Fold `name` into the base weights between two steps (its CPU copy read off the engine thread);
        what `describe()` returns, called right after the merge, before any later engine command."""
        lease = await self.open_adapter(name)

        def merge() -> Any:
            self.engine.lora.merge(lease)
            return describe()

        try:
            return await self.call(merge)
        finally:
            lease.close()

    async def unmerge_adapter(self, name: str | None = None) -> None:
        """Restore the base weights bit for bit, if `name` (None: any adapter) is the merged one."""
        await self.call(lambda: self.engine.unmerge_adapter(name))

    async def remove_adapter(self, record: AdapterRecord) -> None:
        """Unmerge it if merged and unregister it in one engine-thread command (LLMEngine.remove_adapter)."""
        await self.call(lambda: self.engine.remove_adapter(record))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between two steps (e.g. a merge) and return its result."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                loop.call_soon_threadsafe(done.set_exception, exc)
            else:
                loop.call_soon_threadsafe(done.set_result, result)

        self._submit(run)
        return await done

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self._abort(request_id))

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort_request(request_id)
        if out is not None:
            self._streams.deliver(out)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._adapter_threads.shutdown()

    # --- the loop thread ------------------------------------------------------------------------

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self, num_threads: int) -> None:
        try:
            claim_intra_op_threads(num_threads)
            self._claimed.set()
            self._run_loop()
        except BaseException as exc:  # the loop itself broke: nothing queued can progress any more
            self._error = exc
            log.exception("engine loop died")
            self._streams.fail_all(f"engine died: {type(exc).__name__}")
        finally:
            self._claimed.set()

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            while not self._commands.empty():
                self._run_command(self._commands.get())
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=1.0)
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a broken step fails its requests, not the server
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"engine error: {type(exc).__name__}")
            for out in outputs:
                self._streams.deliver(out)

    def _add(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lease: AdapterLease | ComposedLeases | None
    ) -> None:
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, lease)
        except Exception as exc:
            self._streams.deliver(RequestOutput(request_id, [], "", [], len(prompt_token_ids), 0, "error", str(exc)))
        finally:
            self._pending.pop(request_id, None)

    def _run_command(self, command: Callable[[], None]) -> None:
        try:
            command()
        except Exception as exc:
            log.exception("engine command failed: %s", exc)
