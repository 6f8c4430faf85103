"""The base's weights in transparent huge pages (Linux), where the kernel lets a process ask for them.

A decode step reads every weight once. In 4 KiB pages SmolLM2-135M's 540 MB of float32 weights span
~130k pages, more than the TLB covers many times over, so the step walks page tables as it streams;
in 2 MiB pages they span ~270. A step's matmuls on the CPU kernels, 2-vCPU Xeon, 2 threads: 19.3 ->
17.6 ms at 1 row and 24.0 -> 21.7 ms at 8, and the engine's decode step at 8 rows 35.1-35.6 -> 32.4-32.6
ms (docs/benchmarks.md, "Weights in huge pages"); at 32 rows, where the arithmetic bounds the step,
no change.

The weights are copied once, at engine start, into one anonymous mapping advised MADV_HUGEPAGE (what
`/sys/kernel/mm/transparent_hugepage/enabled` = "madvise", the usual default, asks for), each tensor
at a 64-byte offset. Tensors that share storage (a tied LM head) stay shared. Where the kernel says
"never", or the platform has no madvise, nothing moves.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ALIGN = 64  # bytes: a cache line, and more than any dtype needs


def thp_mode() -> str | None:
    """The system's transparent huge page mode ("always", "madvise" or "never"); None where there is none."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """A uint8 tensor of nbytes on a fresh anonymous mapping advised MADV_HUGEPAGE, starting on a 2 MiB
    boundary (the mapping is a huge page longer, for that); None where huge pages cannot be asked for."""
    if thp_mode() not in ("always", "madvise") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched: the first touch then faults in 2 MiB
    whole = torch.frombuffer(region, dtype=torch.uint8)  # holds a reference to the mapping
    skip = -whole.data_ptr() % HUGE_PAGE
    return whole[skip : skip + nbytes]


def move_to_huge_pages(model: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Copy every CPU parameter and buffer of the model of at least min_bytes into one huge-page
    mapping, in place of the old storage (the values, dtypes, shapes and ties unchanged); the bytes
    moved (0 where huge pages are not available). Call before anything holds views of the weights."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}  # storage's address -> where it is registered
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for is_buffer, table in ((False, module._parameters), (True, module._buffers)):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.nbytes < min_bytes or not t.is_contiguous():
                    continue
                if t.untyped_storage().nbytes() != t.nbytes:  # a view of a larger storage: left where it is
                    continue
                key = t.data_ptr()
                owners.setdefault(key, []).append((module, name, is_buffer))
                tensors[key] = t
    sizes = {key: -(-t.nbytes // ALIGN) * ALIGN for key, t in tensors.items()}
    buffer = huge_page_buffer(sum(sizes.values())) if tensors else None
    if buffer is None:
        return 0
    offset, total = 0, 0
    for key in list(tensors):
        t = tensors.pop(key)  # each old storage is freed once copied: the peak is one tensor over the model
        moved = buffer[offset : offset + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
        offset, total = offset + sizes[key], total + t.nbytes
        del t
        param = nn.Parameter(moved, requires_grad=False)  # one object for every owner: ties stay ties
        for module, name, is_buffer in owners[key]:
            if is_buffer:
                module._buffers[name] = moved
            else:
                module._parameters[name] = param
    return total
