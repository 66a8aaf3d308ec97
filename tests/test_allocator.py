"""allocator: freed memory is kept in the process (worker threads included) and handed back by the trim.

Each case runs in a fresh interpreter, because mallopt settings last for the process."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="these are glibc's allocator settings")

# Resident memory (MB) after a 200 MB array made and freed in a worker thread, then after the trim.
PROBE = textwrap.dedent("""
    import os, sys, threading
    import numpy as np
    from melanoma_siamese import allocator

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    if sys.argv[1] == "keep":
        allocator.keep_freed_memory()

    def work():
        block = np.ones(25_000_000)  # 200 MB, every page written
        del block

    before = rss_mb()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    freed = rss_mb()
    allocator.trim_freed_memory()
    print(before, freed, rss_mb())
""")


def _probe(mode: str, **env: str) -> tuple[float, float, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout
    before, freed, trimmed = (float(x) for x in out.split())
    return before, freed, trimmed


def test_glibc_default_returns_a_large_block_at_once():
    before, freed, _ = _probe("default")
    assert freed - before < 50


def test_kept_memory_stays_after_a_worker_thread_frees_it_and_goes_back_on_trim():
    # The server scores in a worker thread: without one heap for all threads, glibc would take fresh pages for
    # this block whatever the mmap limit, and they would be gone (and slow to write again) on the next batch.
    before, freed, trimmed = _probe("keep")
    assert freed - before > 150, (before, freed)
    assert trimmed - before < 50, (before, freed, trimmed)


def test_malloc_variables_in_the_environment_win():
    before, freed, _ = _probe("keep", MALLOC_MMAP_THRESHOLD_="1048576")
    assert freed - before < 50
