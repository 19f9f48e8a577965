"""Process memory hygiene for training on the CPU.

glibc serves allocations above `M_MMAP_THRESHOLD` with their own `mmap` and returns them to the
kernel on free; below it they come from heap arenas that fragment and are rarely given back.
The threshold starts at 128 KiB but glibc raises it (up to 32 MiB) each time a large mmapped
block is freed, so after the first training step activation-sized tensors land in the arenas
and resident memory ends far above the live tensors (measured: 2.3 GB resident for 1.5 GB live
on a 58 M-parameter model). Pinning the threshold keeps every tensor of 1 MiB or more in its
own mapping, so resident memory follows what is actually alive.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache

M_MMAP_THRESHOLD = -3
TENSOR_MMAP_THRESHOLD = 1 << 20


@lru_cache(maxsize=1)
def return_large_frees_to_the_os() -> bool:
    """Pin glibc's mmap threshold at 1 MiB (once per process). False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, TENSOR_MMAP_THRESHOLD))
