"""The app's memory settings: oneDNN's kernel cache bounded, freed heap given back to the system."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from rerank_app import memory
from rerank_core.heap import glibc

needs_glibc = pytest.mark.skipif(glibc() is None, reason="malloc_trim is glibc's")

# Frees 256 MiB of 64 KiB heap blocks while the last block pins the heap's top (so glibc cannot shrink it by
# itself), then prints the RSS before and after the trimming thread has had a few turns.
TRIM_SCRIPT = textwrap.dedent("""
    import ctypes, time, threading, psutil
    from rerank_app import memory
    import rerank_core.heap  # keep_memory_flat imports it (and torch) on its first call, as the app's launch does
    memory.HEAP_TRIM_EVERY_S = 0.1
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(4096)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[:-1]:
        libc.free(block)
    before = psutil.Process().memory_info().rss
    stop = threading.Event()
    memory.keep_memory_flat(stop)
    time.sleep(1.0)
    stop.set()
    print(before, psutil.Process().memory_info().rss)
""")


@needs_glibc
def test_freed_heap_goes_back_to_the_system() -> None:
    env = {key: value for key, value in os.environ.items() if key != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    result = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=120, check=True)
    before, after = (int(value) for value in result.stdout.split())
    assert before - after > 200 * 2**20, (before, after)  # most of the 256 MiB freed


def test_native_options_are_set_unless_the_user_chose_them(monkeypatch) -> None:
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    memory.set_native_runtime_options()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(memory.ONEDNN_PRIMITIVE_CACHE)
    assert os.environ["GOMP_SPINCOUNT"] == str(memory.OPENMP_SPIN_COUNT)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    memory.set_native_runtime_options()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    assert os.environ["GOMP_SPINCOUNT"] == "5"


@needs_glibc
def test_one_trimming_thread_however_often_the_app_launches(monkeypatch) -> None:
    monkeypatch.setattr(memory, "_TRIMMER", [])
    stop = threading.Event()
    try:
        first = memory.keep_memory_flat(stop)
        assert first is not None and first.is_alive()
        assert memory.keep_memory_flat(stop) is first
    finally:
        stop.set()
    first.join(timeout=5)
    assert not first.is_alive()


def test_the_app_package_sets_openmp_spinning_before_torch_loads() -> None:
    """OpenMP reads GOMP_SPINCOUNT once, when torch loads it: rerank_app must set it before importing torch, and
    oneDNN's cache bound before any kernel."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("GOMP_SPINCOUNT", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    probe = "import sys, os, app; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    first = subprocess.run([sys.executable, "-c", "import sys, os, rerank_app; print(os.environ['GOMP_SPINCOUNT'], "
                            "os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], 'torch' in sys.modules)"],
                           capture_output=True, text=True, env=env, timeout=120, check=True)
    assert first.stdout.split() == ["1000", "256", "False"]
    served = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300,
                            check=True)
    assert served.stdout.split()[0] == "1000"
