"""How the process's memory allocator (glibc's) keeps or returns freed memory, per command. No torch.

Training keeps freed memory (its large batch tensors come back every step); the server returns it, so its
memory falls back after a burst of large uploads. Explicit MALLOC_* variables in the environment win.
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


def return_freed_memory() -> None:
    """Serve every allocation over 4 MB from its own pages and give them back when freed.

    glibc raises its mmap threshold after each large free, so once a 186 MB decoded image (Pillow allocates
    it in 16 MB blocks) has been freed, the next ones come from the heap and stay in the process: a server
    kept 380 MB after a burst of 62-megapixel uploads. A fixed threshold turns that adjustment off.
    """
    m_mmap_threshold = -3
    _mallopt({m_mmap_threshold: 4 * 1024 * 1024})


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
    """Give the heap's free pages back to the system (malloc_trim). What the mmap threshold of
    return_freed_memory misses: smaller blocks freed in the middle of the heap after a burst of uploads, a
    few hundred MB that otherwise stay in the process. The server calls it when it falls idle."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
