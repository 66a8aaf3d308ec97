"""The server under a burst of huge uploads, against real uvicorn in its own process: memory stays bounded
and falls back, the health check stays quick, every request gets an answer."""
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from melanoma_siamese.serve import IDLE_TRIM_S

from helpers import serve_process
from inference_run import shared_run

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
MB = 1024 * 1024


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def _huge_png(side: int = 7874) -> bytes:
    """A 62-megapixel PNG (a skin-coloured field with a dark lesion) that compresses to a few hundred KB:
    small on the wire, 186 MB once decoded."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (200, 160, 130))
    ImageDraw.Draw(image).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(70, 40, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Watch:
    """Samples the server's resident memory and times its health check while a burst runs."""

    def __init__(self, http: httpx.Client, pid: int):
        self.http, self.pid = http, pid
        self.peak, self.health_seconds, self.stop = 0, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss(self.pid))
            start = time.perf_counter()
            assert self.http.get("/api/health", timeout=10).status_code == 200
            self.health_seconds.append(time.perf_counter() - start)
            time.sleep(0.05)


def _burst(http: httpx.Client, pid: int, data: bytes, n: int, **params) -> tuple[list[int], Watch]:
    watch = Watch(http, pid)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    with ThreadPoolExecutor(max_workers=n) as pool:
        responses = list(pool.map(lambda _: http.post("/api/predict", params=params, timeout=300,
                                                      files={"file": ("big.png", data, "image/png")}), range(n)))
    watch.stop.set()
    thread.join(timeout=30)
    return [r.status_code for r in responses], watch


@pytest.mark.slow
def test_twenty_62_megapixel_uploads_keep_memory_bounded_and_health_quick(tiny_data, tmp_path_factory, tmp_path):
    run = shared_run(tiny_data, tmp_path_factory)
    data = _huge_png()
    with serve_process(run, tmp_path / "server.log") as (server, base), \
            httpx.Client(base_url=base, timeout=60) as http:
        # One request first: what a served model takes at rest (weights, index, warmed-up allocator).
        assert http.post("/api/predict", files={"file": ("big.png", data, "image/png")},
                         timeout=120).status_code == 200
        time.sleep(IDLE_TRIM_S + 0.5)  # the server hands freed memory back once quiet: at rest is after that
        start = _rss(server.pid)
        plain, watch = _burst(http, server.pid, data, 20)
        with_saliency, watch_saliency = _burst(http, server.pid, data, 20, saliency="true")
        time.sleep(2)
        after = _rss(server.pid)
    report = (f"start {start / MB:.0f} MB, peak {watch.peak / MB:.0f} / {watch_saliency.peak / MB:.0f} MB (with "
              f"saliency), after {after / MB:.0f} MB; slowest health {max(watch.health_seconds):.2f} / "
              f"{max(watch_saliency.health_seconds):.2f} s")
    print(report)
    assert plain == [200] * 20 and with_saliency == [200] * 20, report
    assert watch.peak < start + 1024 * MB and watch_saliency.peak < start + 1024 * MB, report
    assert max(watch.health_seconds + watch_saliency.health_seconds) < 1.0, report
    assert after < start + 256 * MB, report
