"""Whether triton runs its kernels in its interpreter, on CPU tensors (TRITON_INTERPRET=1, for tests).

Read by the kernels (triton_kernels.py) and by the resolve step (engine/resolve.py), apart from the
selector (selector.py): that imports the triton backend, so the kernels cannot import it back.
"""

from __future__ import annotations

import os


def triton_interpreted() -> bool:
    """Whether triton runs kernels in its interpreter, on CPU tensors (triton's own reading of the variable)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")
