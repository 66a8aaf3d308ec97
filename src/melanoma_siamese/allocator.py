"""How the process's memory allocator (glibc's) keeps or returns freed memory, per command. No torch.

Training keeps freed memory (its large batch tensors come back every step). The server keeps glibc's own
policy while it works and hands freed memory back once it falls idle, so its memory falls back after a burst
of large uploads. Explicit MALLOC_* variables in the environment win.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional


def _libc() -> Optional[ctypes.CDLL]:
    """glibc, where this is Linux with glibc and no MALLOC_* variable chose for the user; else None."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return None


def _mallopt(settings: dict[int, int]) -> None:
    libc = _libc()
    if libc is None:
        return
    for option, value in settings.items():
        libc.mallopt(option, value)


def keep_freed_memory() -> None:
    """Have glibc keep freed memory in the process, as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... would.

    glibc serves allocations over 32 MB from fresh pages and returns them on free. On virtual machines
    that hand freed memory back to the host, the first write to fresh pages is slow, and every large
    batch tensor pays it on every batch: `bench` measured batched augmentation at half speed here.
    Explicit MALLOC_* variables in the environment win.
    """
    m_trim_threshold, m_mmap_max = -1, -4
    _mallopt({m_mmap_max: 0, m_trim_threshold: 2**31 - 1})


def trim_freed_memory() -> None:
    """Give the heap's free pages back to the system (malloc_trim), those in the middle of the heap too.

    The server calls it once it has been idle for a moment: after a burst of 62-megapixel uploads (186 MB
    each decoded) glibc raises its mmap threshold and keeps the next ones' freed memory in the heap, a few
    hundred MB. Not after every request: a fixed 4 MB mmap threshold, which also returned that memory, made
    every forward pass with more than 4 MB of activations write fresh pages, slow on a virtual machine: a
    lone client's request took 142-156 ms against 106-133 ms with glibc's own policy (median of 10 back to
    back; ResNet-18 at 256 px, 2-core CPU)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
