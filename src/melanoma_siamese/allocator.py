"""How the process's memory allocator (glibc's) keeps or returns freed memory. No torch.

Every command that runs a model keeps freed memory in one heap (its large tensors come back every batch, and
fresh pages are slow to write on a virtual machine); the server also hands freed memory back once it falls
idle, so its memory falls back after a burst of large uploads. Explicit MALLOC_* variables in the environment win.
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


def allocator_tunable() -> bool:
    """Whether keep_freed_memory and trim_freed_memory act here (glibc, no MALLOC_* variable set)."""
    return _libc() is not None


def _mallopt(settings: dict[int, int]) -> None:
    libc = _libc()
    if libc is None:
        return
    for option, value in settings.items():
        libc.mallopt(option, value)


def keep_freed_memory() -> None:
    """Have glibc keep freed memory in one heap for every thread, as MALLOC_MMAP_MAX_=0 MALLOC_ARENA_MAX=1
    MALLOC_TRIM_THRESHOLD_=... would.

    By default glibc serves allocations over 32 MB from fresh pages and returns them on free. On virtual
    machines that hand freed memory back to the host, the first write to fresh pages is slow, and every large
    batch tensor pays it on every batch: `bench` measured batched augmentation at half speed here. One heap for
    all threads, because a thread other than the main one allocates from its own arena, and there glibc takes
    fresh pages for anything over 64 MB whatever the mmap limit says: the server scores its batches in a worker
    thread, and a batch of 32 at 256 px has 134 MB activations (ResNet-18, 2-core CPU, worker thread, ms per
    image at batch 32: 41-44 glibc's default, 45 keeping freed memory per thread, 30-32 in one heap).
    Explicit MALLOC_* variables in the environment win.
    """
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    _mallopt({m_mmap_max: 0, m_trim_threshold: 2**31 - 1, m_arena_max: 1})


def trim_freed_memory() -> None:
    """Give the heap's free pages back to the system (malloc_trim), those in the middle of the heap too.

    The server calls it once it has been idle for a moment: it keeps freed memory while it works
    (keep_freed_memory), so after a burst of 62-megapixel uploads (186 MB each decoded) the heap holds their
    freed memory. Not after every request: memory handed back is slow to write again on a virtual machine,
    and every forward pass would pay for it (a fixed 4 MB mmap threshold, tried once, made a lone client's
    request take 142-156 ms against 106-133 ms; median of 10 back to back; ResNet-18 at 256 px, 2-core CPU)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
