"""What a long-running app does so that its native libraries stay fast and its memory flat."""

from __future__ import annotations

import os
import threading

# oneDNN keeps a compiled kernel set per input shape, 1,024 of them by default. A batch of n prompts padded to a
# length is one shape per matmul, so an app serving many lengths and batch sizes grew by ~200 MiB that nothing gave
# back (150 mixed scorings, AMX CPU); 256 kept it flat at the same speed.
ONEDNN_PRIMITIVE_CACHE = 256
# The app's forward passes run on one thread (rerank_core/compute.py), whose OpenMP threads by default spin ~300,000
# times after each parallel region before they sleep. Beside a fine-tune (a second process on the same cores) the
# two spin against each other: a 330-token pass took 617 ms and the training loop ran 4 steps where it ran 11.
# Spinning 1,000 times: 239 ms and 13 steps beside it, 169 ms alone (130 ms with the default spin; 202 ms when
# every request thread scored itself, as before). The fine-tunes the app starts inherit it.
OPENMP_SPIN_COUNT = 1000
# glibc keeps what the scorer frees (activations of a 4,096-token batch are ~100 MiB) for the next allocation and
# rarely returns it; malloc_trim(0) gives back the free pages (the same 150 scorings: +270 MiB kept, then 0).
HEAP_TRIM_EVERY_S = 10.0
# glibc gives each server thread a heap of its own; two shared heaps kept 8 clients' RSS growth under 9%.
HEAP_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter

_TRIMMER: list[threading.Thread] = []  # the process's trimming thread, once started


def set_native_runtime_options() -> None:
    """Set what OpenMP and oneDNN read once, when torch loads them and at the first kernel: called by the package
    before anything imports torch. A value the user set is kept."""
    os.environ.setdefault("GOMP_SPINCOUNT", str(OPENMP_SPIN_COUNT))
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE))


def keep_memory_flat(stop: threading.Event | None = None) -> threading.Thread | None:
    """Share two heaps and give freed heap back every HEAP_TRIM_EVERY_S seconds, from one thread per process
    (an app launched again in the same process reuses it)."""
    from rerank_core.heap import glibc  # here: rerank_core imports torch, which must not load before the options

    libc = glibc()
    if libc is None:
        return None
    if _TRIMMER and _TRIMMER[0].is_alive():
        return _TRIMMER[0]
    libc.mallopt(_M_ARENA_MAX, HEAP_ARENAS)
    stop = stop or threading.Event()

    def trim() -> None:
        while not stop.wait(HEAP_TRIM_EVERY_S):
            libc.malloc_trim(0)

    thread = threading.Thread(target=trim, name="heap-trim", daemon=True)
    thread.start()
    _TRIMMER[:] = [thread]
    return thread
