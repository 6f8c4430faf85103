"""A serving process's CPU threads for torch ops belong to the engine thread.

torch's CPU ops and the CPU kernels (model/cpu_kernels.c) run their parallel regions on OpenMP
(libgomp). libgomp keeps a pool of worker threads for every thread that has run a parallel region,
and while its workers outnumber the CPUs it stops spin-waiting between regions: each region then
starts with a futex wake-up of its workers. On a 2-vCPU VM that took one LoRA kernel call from
28 us to 119 us (docs/benchmarks.md, "OpenMP pools and slot tables", with the script), and a server
whose model loaded on the main thread and whose adapters loaded on executor threads had three
pools on two CPUs, for a decode step of ~360 parallel regions.

So, for AsyncEngine: the model loads on a thread of its own that ends, its pool with it
(`run_on_own_thread`); the engine thread takes the configured count, and every thread that first uses
torch after that runs its ops on one thread and starts no pool (`claim_intra_op_threads`); the threads
that read adapters set that for MKL too (`use_one_thread`). Off the
engine thread, torch work (reading adapters, checking uploads) is small, and serial there it also
leaves the cores to the steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

# torch's thread count for threads that set none, as it was before the first claim made it 1
# (a process may start several engines, e.g. a test session).
_default_num_threads: int | None = None


def run_on_own_thread(fn: Callable[[], T], name: str) -> T:
    """fn() on a new thread, joined: the OpenMP workers its torch ops start end with that thread."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(fn())
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def run_at_threads(num_threads: int, fn: Callable[[], T], name: str) -> T:
    """fn() on a new thread whose torch ops use num_threads, whatever the caller's count: a measurement
    of the steps' speed, taken at the count the engine thread will step with. torch.set_num_threads also
    moves the process-wide default; that is put back as a new thread read it before."""
    default = run_on_own_thread(torch.get_num_threads, name)

    def at_count() -> T:
        torch.set_num_threads(num_threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(default)

    return run_on_own_thread(at_count, name)


def claim_intra_op_threads(num_threads: int) -> None:
    """On the engine thread: keep num_threads for this thread's torch ops, one for threads that start using torch later.

    torch.set_num_threads sets the calling thread's OpenMP and MKL thread counts and a process-wide
    default that a thread reads once, at its first parallel op (or get_num_threads); so this thread
    reads it first, sets the engine's count, then a passing thread sets the default to 1, which leaves
    this thread's own count as it is. Threads that used torch before keep theirs."""
    global _default_num_threads
    if _default_num_threads is None:
        _default_num_threads = run_on_own_thread(torch.get_num_threads, "lora-serve-threads")
    torch.get_num_threads()  # this thread's one-time read of the default, done now: not after it becomes 1
    torch.set_num_threads(num_threads)
    run_on_own_thread(lambda: torch.set_num_threads(1), "lora-serve-threads")


def default_num_threads() -> int:
    """The thread count of torch ops on a thread that set none, as it was before any claim."""
    return _default_num_threads or torch.get_num_threads()


def use_one_thread() -> None:
    """On a thread other than the engine's, before its torch work: its ops on one thread, MKL's BLAS and LAPACK
    calls included. The default a claim leaves (one thread) reaches a thread's OpenMP regions, but not a
    matmul or an SVD that calls MKL first: MKL's own count (one per CPU) started a pool of its own there,
    which on a busy 2-vCPU VM took a 20 MB adapter's validation from 0.1-0.2 s to 1-5 s. torch.set_num_threads
    sets this thread's OpenMP and MKL counts (and the default, already 1 after a claim)."""
    torch.set_num_threads(1)
