"""glibc's heap tuned for forward passes: what one pass frees, the next reuses instead of faulting it in again."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Any

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "glibc", "reuse_freed_activations"]

# glibc's defaults adapt: a block is mmap'ed until a freed one raises the threshold, and free memory at the top of
# the heap past twice that threshold goes back to the system. A forward pass frees its activations (tens of MiB)
# in an order that keeps tripping both, so the next pass touched fresh pages again: 47,000-100,000 page faults in
# each 3 x 1,216-token pass (~300 MiB), ~8% of its time (1.10 -> 1.03 s, AMX CPU, bf16).
MMAP_THRESHOLD = 32 * 1024**2  # glibc's largest: blocks up to this size come from the heap
TRIM_THRESHOLD = 128 * 1024**2  # free memory kept at the heap's top; the app's trimmer still gives it back
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3


@functools.cache
def glibc() -> Any | None:
    """The C library when it is glibc (mallopt and malloc_trim are glibc's); None on macOS, musl or Windows."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(None)
        if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):
            return libc
    return None


@functools.cache
def reuse_freed_activations() -> bool:
    """Fix both thresholds (setting either stops glibc adapting them), once per process; False where not glibc."""
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                       TRIM_THRESHOLD))
