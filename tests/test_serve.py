"""The HTTP API and web page on a tiny trained run: answers, every bad request, concurrency, fuzzing, a browser."""
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from melanoma_siamese.cli import build_parser
from melanoma_siamese.inference import Predictor, load_run, predict_paths
from melanoma_siamese.serve import DEFAULT_MAX_UPLOAD_BYTES, create_app

from helpers import HAM, serve_process
from inference_run import image_files, png_header_only, shared_run

pytestmark = [pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]
MB = 1024 * 1024
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    return shared_run(tiny_data, tmp_path_factory)


@pytest.fixture(scope="module")
def app(run_dir):
    return create_app(run_dir)


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as test_client:
        yield test_client


def upload(client, data: bytes, name: str = "lesion.jpg", **params):
    return client.post("/api/predict", files={"file": (name, data, "image/jpeg")}, params=params)


def test_health_and_schema(client):
    health = client.get("/api/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["image_size"] == 32 and health.json()["index_size"] > 0
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/predict", "/api/health", "/api/similar/{image_id}/image"} <= set(paths)


def test_predict_answers_as_the_cli_does_with_thumbnails_and_saliency(client, run_dir, tiny_data):
    path = image_files(tiny_data)[0]
    answer = upload(client, path.read_bytes(), saliency="true")
    assert answer.status_code == 200
    body = answer.json()
    run = load_run(run_dir)
    expected = predict_paths(Predictor(run), [path])[0]
    assert body["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    assert body["decision"] == expected["decision"] and body["threshold"] == expected["threshold"]
    # The health check's threshold is on the same scale as an answer's (it was the raw score's, unlabelled).
    health = client.get("/api/health").json()
    assert health["threshold"] == pytest.approx(body["threshold"]) and health["score_threshold"] == pytest.approx(
        body["score_threshold"])
    assert body["knn_probability"] == pytest.approx(expected["knn_probability"], abs=1e-6)
    u = body["unfamiliar"]  # which rule flagged, and each rule's own share, as predict's CSV gives them
    assert u["appearance_percentile"] == pytest.approx(expected["unfamiliar_texture_percentile"])
    assert u["flag"] == (u["embedding_flag"] or u["appearance_flag"])
    assert [s["id"] for s in body["similar"]] == [expected[f"neighbour_{n}_id"] for n in range(1, 6)]
    assert body["saliency_png"].startswith("data:image/png;base64,")
    assert "not a diagnosis" in body["note"]
    thumb = client.get(body["similar"][0]["image_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert thumb.content.startswith(b"\x89PNG")


def test_page_is_served_with_the_research_note(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "not a diagnosis" in page.text and "calibrated on validation images" in page.text
    assert "unlike every image the model was trained on" in page.text


@pytest.mark.parametrize("name, data, status", [
    ("notes.jpg", b"just some text, not an image", 415),
    ("empty.jpg", b"", 400),
    ("bomb.png", png_header_only(50000, 50000), 413),
    ("wide.png", png_header_only(20000, 5000), 413),
    ("../../etc/passwd", None, 400),
    ("..\\..\\boot.ini", None, 400),
], ids=["not-an-image", "empty", "bomb-50000x50000", "bomb-20000x5000", "traversal", "traversal-backslash"])
def test_bad_uploads_are_4xx_json_and_the_server_keeps_serving(client, tiny_data, name, data, status):
    good = image_files(tiny_data)[0].read_bytes()
    answer = upload(client, good if data is None else data, name)
    assert answer.status_code == status and answer.json()["detail"]
    assert upload(client, good).status_code == 200


def test_corrupt_image_is_400(client, tiny_data):
    good = image_files(tiny_data)[0].read_bytes()
    for corrupt in (good[:120], good[:600] + b"\0" * 50):
        answer = upload(client, corrupt)
        assert answer.status_code == 400, answer.text
        assert "corrupt" in answer.json()["detail"] or "cannot be read" in answer.json()["detail"]


def test_a_parameter_the_route_does_not_take_is_refused_not_ignored(client, tiny_data):
    good = image_files(tiny_data)[0].read_bytes()
    answer = upload(client, good, prevalence=0.02)
    detail = answer.json()["detail"]
    assert answer.status_code == 422 and "/api/predict does not take 'prevalence'" in detail
    assert "serve --prevalence P" in detail
    assert upload(client, good, neighbours=2).status_code == 200
    files = [("files", ("a.jpg", good, "image/jpeg")), ("files", ("b.jpg", good, "image/jpeg"))]
    for data, field in (({"sex": "alien"}, "sex"), ({"site": "moon"}, "site"), ({"age": "300"}, "age")):
        answer = client.post("/api/patient", files=files, data=data)
        assert answer.status_code == 422 and answer.json()["detail"].startswith(f"form field '{field}': ")
    assert "expected female or male" in client.post("/api/patient", files=files, data={"sex": "alien"}).text
    for data in ({"sex": "Female", "site": "back"}, {"sex": "unknown", "site": "n/a"}):  # words for "not recorded"
        assert client.post("/api/patient", files=files, data=data).status_code == 200


def test_a_training_image_is_named_as_one(client, run_dir, tiny_data):
    train_id = str(load_run(run_dir, "cpu").index.part("train").ids[0])
    answer = upload(client, (tiny_data / "train-image" / "image" / f"{train_id}.jpg").read_bytes()).json()
    assert answer["known_case"]["id"] == train_id and "not a test of the model" in answer["known_case"]["note"]


def test_upload_size_limit_default_20_mb_gives_413(client):
    assert DEFAULT_MAX_UPLOAD_BYTES == 20 * MB
    just_over = upload(client, b"\0" * (20 * MB + 10))  # passes the body limit, fails the file limit
    assert just_over.status_code == 413 and "upload limit" in just_over.json()["detail"]
    far_over = upload(client, b"\0" * (21 * MB))  # refused from Content-Length before parsing
    assert far_over.status_code == 413 and "at most 20 MB (--max-upload-mb)" in far_over.json()["detail"]

    def chunks():
        for _ in range(22):
            yield b"\0" * MB

    streamed = client.post("/api/predict", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=x"})
    assert streamed.status_code == 413
    assert client.get("/api/health").status_code == 200


def test_size_limit_is_configurable(run_dir, tiny_data):
    from fastapi.testclient import TestClient

    small = TestClient(create_app(run_dir, max_upload_bytes=1000))
    assert upload(small, image_files(tiny_data)[0].read_bytes() + b"\0" * 1000).status_code == 413
    args = build_parser().parse_args(["serve", "--run", "r", "--max-upload-mb", "5"])
    assert args.max_upload_mb == 5


@pytest.mark.parametrize("image_id, statuses", [
    ("ISIC_0000000_absent", {404}),
    ("..", {404, 422}),
    ("..%2F..%2Fetc%2Fpasswd", {404, 422}),
    ("%2e%2e%2f%2e%2e%2fetc%2fpasswd", {404, 422}),
    ("..%5C..%5Cwindows", {404, 422}),
    ("%2Fetc%2Fpasswd", {404, 422}),
    (".bashrc", {404, 422}),
])
def test_unknown_and_traversal_ids_are_refused(client, image_id, statuses):
    answer = client.get(f"/api/similar/{image_id}/image")
    assert answer.status_code in statuses and answer.headers["content-type"] == "application/json"
    assert client.get("/api/health").status_code == 200


def test_binds_127_0_0_1_by_default():
    assert build_parser().parse_args(["serve", "--run", "r"]).host == "127.0.0.1"


@pytest.mark.slow
def test_50_concurrent_requests_to_the_serve_command_equal_single_answers(run_dir, tiny_data, tmp_path):
    with serve_process(run_dir, tmp_path / "server.log") as (_, base), httpx.Client(base_url=base, timeout=120) as http:
        images = [p.read_bytes() for p in image_files(tiny_data)[:5]]
        single = [upload(http, data).json() for data in images]
        jobs = [i % len(images) for i in range(50)]
        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(lambda i: (i, upload(http, images[i])), jobs))
    for i, answer in answers:
        assert answer.status_code == 200
        # Scored in a batch, an embedding's float rounding may differ from the lone image's (about 1e-7).
        assert same_answer(answer.json(), single[i])


def same_answer(a, b, tolerance: float = 1e-5) -> bool:
    """Equal answers: the same keys, words and ids, and numbers within `tolerance`."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_answer(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_answer(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return abs(a - b) <= tolerance
    return a == b


def test_concurrent_requests_share_one_forward_pass_and_answer_as_one_at_a_time(run_dir, tiny_data):
    """While one batch is scored, the next requests queue up: they are scored in one call, and each gets
    the answer it would get alone (its own number of neighbours included)."""
    import asyncio

    from fastapi.testclient import TestClient

    images = [p.read_bytes() for p in image_files(tiny_data)[:9]]
    with TestClient(create_app(run_dir, options={"max_batch": 1})) as alone:
        single = [upload(alone, data, neighbours=1 + i % 3).json() for i, data in enumerate(images)]
    app = create_app(run_dir, options={"max_batch": 8, "batch_wait_ms": 0})
    calls, release = [], threading.Event()
    predictor = app.state.service.predictor
    score = predictor.score

    def counted(pixels):
        calls.append(len(pixels))
        if len(calls) == 1:
            release.wait(60)  # the first request holds the model while the other eight queue up
        return score(pixels)

    predictor.score = counted

    async def scenario():
        batcher = app.state.batcher
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            async def one(i):
                return await http.post("/api/predict", params={"neighbours": 1 + i % 3},
                                       files={"file": ("lesion.jpg", images[i], "image/jpeg")})

            first = asyncio.create_task(one(0))
            while not calls:
                await asyncio.sleep(0.01)
            rest = [asyncio.create_task(one(i)) for i in range(1, 9)]
            while batcher.waiting < 8:
                await asyncio.sleep(0.01)
            release.set()
            return await asyncio.gather(first, *rest)

    answers = asyncio.run(scenario())
    assert calls == [1, 8]
    for i, answer in enumerate(answers):
        assert answer.status_code == 200 and len(answer.json()["similar"]) == 1 + i % 3
        assert same_answer(answer.json(), single[i])


@pytest.mark.slow
def test_fuzz_from_the_openapi_schema_gives_no_5xx(app):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 4  # health, predict, similar image, patient
    seen = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(mode))
            @settings(max_examples=30, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call()
                seen.append(response.status_code)
                assert response.status_code < 500, (case.path, case.query, response.text[:300])

            try:
                check()
            except Unsatisfiable:
                # GET /api/health takes no input: there is nothing to make invalid.
                assert mode == GenerationMode.NEGATIVE and operation.path == "/api/health"
    assert len(seen) > 120 and {400, 404, 415, 422} <= set(seen)


@contextmanager
def uvicorn_thread(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if found is None:
        message = "no Chromium at /usr/bin/chromium (Debian's `chromium` package; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must run the browser test")
        pytest.skip(message)
    return found


def _percent_pair(p: float, t: float) -> tuple[str, str]:
    """The page's own formatting of a probability beside its threshold (index.html, percentPair())."""
    for digits in range(5):
        a, b = f"{100 * p:.{digits}f}", f"{100 * t:.{digits}f}"
        if a != b or p == t:
            return a + "%", b + "%"
    side = " (just below the threshold)" if p < t else " (just above the threshold)"
    return f"{100 * p:.4f}%{side}", f"{100 * t:.4f}%"


def _percent(p: float) -> str:
    """The page's formatting of a lone share (index.html, percent())."""
    v = 100 * p
    return (f"{v:.0f}" if v >= 10 else f"{v:.1f}" if v >= 1 else f"{v:.2f}") + "%"


def _noise_png(tmp_path, side: int = 64):
    import numpy as np
    from PIL import Image

    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def _upload_in_page(page, path, done_count: int) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function(f"window.answers >= {done_count}", timeout=60_000)


@pytest.mark.slow
def test_browser_uploads_an_image_and_sees_the_apis_answer(app, tiny_data, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    from melanoma_siamese.display import distance_text

    image, noise = image_files(tiny_data)[3], _noise_png(tmp_path)
    real = next(iter(sorted((HAM / "train-image" / "image").glob("*.jpg"))), None) if HAM.is_dir() else None
    with uvicorn_thread(app) as base, sync_playwright() as playwright:
        with httpx.Client(base_url=base, timeout=60) as http:
            expected = upload(http, image.read_bytes()).json()
            expected_noise = upload(http, noise.read_bytes(), "noise.png").json()
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(base + "/")
            page.evaluate("window.answers = 0; new MutationObserver(() => { if (document.body.dataset.state) "
                          "window.answers++; }).observe(document.body, {attributes: true, attributeFilter: "
                          "['data-state']})")
            assert "not a diagnosis" in page.inner_text("#note")
            # The upload limit arrives with /api/health after the page has loaded: wait for it, not for luck.
            page.wait_for_function("document.getElementById('limit').textContent.includes('MB')", timeout=30_000)
            _upload_in_page(page, image, 1)
            page.wait_for_function("[...document.querySelectorAll('#similar img')].every(i => i.complete)",
                                   timeout=30_000)
            shown = page.inner_text("#probability")
            raw = float(page.get_attribute("#probability", "data-probability"))
            threshold = page.inner_text("#threshold")
            assumed = page.inner_text("#assumed")
            loaded = page.eval_on_selector_all("#similar img", "imgs => imgs.map(i => i.naturalWidth)")
            captions = page.eval_on_selector_all("#similar figcaption", "fs => fs.map(f => f.textContent)")
            saliency = page.eval_on_selector("#saliency", "i => i.complete && i.naturalWidth")
            caption = page.inner_text("#saliency-caption")
            familiar_hidden = page.is_hidden("#unfamiliar")
            known = page.is_visible("#known") and page.inner_text("#known")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            _upload_in_page(page, image, 2)  # the same file chosen again is scored again
            _upload_in_page(page, noise, 3)
            noise_warning = page.is_visible("#unfamiliar") and page.inner_text("#unfamiliar")
            noise_familiarity = page.inner_text("#familiarity")
            noise_known = page.is_visible("#known")
            page.screenshot(path=str(tmp_path / "unfamiliar.png"), full_page=True)
            real_warning = None
            if real is not None:  # a real dermoscopic photo, to a run trained on generated cartoons
                _upload_in_page(page, real, 4)
                real_warning = page.is_visible("#unfamiliar") and page.is_visible("#synthetic")
                page.screenshot(path=str(tmp_path / "real.png"), full_page=True)
            phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
            phone.goto(base + "/")
            phone.set_input_files("#file", str(image))
            phone.wait_for_selector("body[data-state=done]", timeout=60_000)
            answer_top = phone.eval_on_selector("#result", "e => e.getBoundingClientRect().top")
            image_top = phone.eval_on_selector("#preview", "e => e.getBoundingClientRect().top")
            phone.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        finally:
            browser.close()
    shots = os.environ.get("MELANOMA_SIAMESE_SCREENSHOTS")
    if shots:  # to look at them: MELANOMA_SIAMESE_SCREENSHOTS=DIR pytest -k browser
        for name in ("page.png", "unfamiliar.png", "phone.png", "real.png"):
            if (tmp_path / name).is_file():
                shutil.copy(tmp_path / name, os.path.join(shots, name))
    assert raw == expected["probability"]
    # A training image sent back is named as one (its vote counts its own label); nothing is said of the noise.
    assert known == (expected["known_case"] and f"This image is {expected['known_case']['note']}.")
    assert not noise_known and expected_noise["known_case"] is None
    assert (shown, threshold) == _percent_pair(expected["probability"], expected["threshold"])
    assert _percent(expected["prevalence"]) in assumed
    above = float(shown.split("%")[0]) > float(threshold[:-1]) or "just above" in shown
    assert (above or expected["probability"] == expected["threshold"]) == (expected["decision"] == "melanoma")
    assert (raw >= expected["threshold"]) == (expected["decision"] == "melanoma")
    assert len(loaded) == len(expected["similar"]) and all(width > 0 for width in loaded)
    assert all(s["id"] in c for s, c in zip(expected["similar"], captions))
    # Distances as `predict` prints them (three significant digits, never "0.000" for a close neighbour).
    assert all(f"distance {distance_text(s['distance'])}" in c for s, c in zip(expected["similar"], captions)), captions
    assert saliency > 0 and "8x8" in caption
    assert familiar_hidden == (not expected["unfamiliar"]["flag"])
    # Each rule named with its own numbers, so a flag by texture is not shown beside the embedding's alone.
    assert "in the model's embedding: " in noise_familiarity and "in texture: " in noise_familiarity
    assert expected_noise["unfamiliar"]["flag"]
    assert noise_warning and "unlike every image the model was trained on" in noise_warning
    assert answer_top < image_top  # on a phone the answer comes first
    assert real is None or real_warning  # where the real sample is here: flagged, beside the generated-data note
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_without_the_grad_cam_package_the_answer_says_there_is_no_map(run_dir, monkeypatch):
    import importlib.util

    import numpy as np

    from melanoma_siamese.serve import Service

    service = Service(load_run(run_dir, "cpu"), DEFAULT_MAX_UPLOAD_BYTES)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytorch_grad_cam" else real(name, *a))
    png, note = service.saliency(np.zeros((1, 32, 32, 3), np.uint8))
    assert png is None and "not installed" in note
