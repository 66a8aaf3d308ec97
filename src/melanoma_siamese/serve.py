"""A FastAPI application over a trained run: predict an uploaded image, show similar known cases, a web page.

Every bad request (not an image, corrupt, too large in bytes or in pixels, unknown or malformed id) is a
4xx JSON error, and the server keeps serving. It binds to 127.0.0.1 unless told otherwise.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time, and fastapi is
# imported inside create_app (an optional extra), where string annotations could not be resolved.
import argparse
import base64
import copy
import io
import threading
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
from PIL import Image

from .errors import ImageRejected
from .inputs import DEFAULT_MAX_PIXELS, max_pixels_option, read_image

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Room for the multipart boundary and headers around the one file.
MULTIPART_OVERHEAD = 64 * 1024
THUMBNAIL_SIDE = 160
ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
NOTE = ("Research tool, not a diagnosis. The probability is calibrated on validation images and stated for a "
        "population with the prevalence given beside it; the decision compares it with a threshold on the same "
        "scale, chosen on validation images.")
# Decoding and scoring at once: a 62-megapixel PNG (no reduced-scale decoding, unlike JPEG) is 186 MB
# while it is decoded, so this bounds the memory a burst can take; the rest wait in a queue.
DEFAULT_WORKERS = 2
DEFAULT_QUEUE = 64
# Concurrent requests share one forward pass (microbatch): up to this many images, waiting up to this long for
# requests still being decoded.
DEFAULT_MAX_BATCH = 32
DEFAULT_BATCH_WAIT_MS = 5.0
MAX_NEIGHBOURS = 50
IDLE_TRIM_S = 1.0


class Service:
    """A loaded run with what concurrent requests need: a predictor, and a Grad-CAM copy behind a lock."""

    def __init__(self, run, max_pixels: int, prevalence: Optional[float] = None):
        from .inference import Predictor

        self.run, self.max_pixels = run, max_pixels
        self.predictor = Predictor(run, prevalence=prevalence)
        # Grad-CAM hooks the target layer: on the shared model they would catch other requests' activations.
        self.saliency_run = copy.copy(run)
        self.saliency_run.encoder = copy.deepcopy(run.encoder)
        self.saliency_run.classifier = copy.deepcopy(run.classifier)
        self.saliency_lock = threading.Lock()
        self.known = {str(i): run.image_paths[str(i)] for i in run.index.ids if str(i) in run.image_paths}

    def predict(self, data: bytes, saliency: bool, neighbours: int) -> dict:
        """One request on its own: decode, score, finish."""
        pixels = self.decode(data)
        return self.finish(self.answers(pixels[None])[0], pixels, saliency, neighbours)

    def decode(self, data: bytes) -> np.ndarray:
        """S x S x 3 uint8, or ImageRejected with the reason."""
        return read_image(data, self.run.config.data.image_size, self.max_pixels, self.run.checks)

    def answers(self, pixels: np.ndarray) -> list[dict]:
        """Answers for a batch of images, each with the most similar known images a request may ask for (each
        request keeps its own number in `finish`): one forward pass for any mix of requests."""
        return self.predictor.answers(pixels, MAX_NEIGHBOURS)

    def finish(self, result: dict, pixels: np.ndarray, saliency: bool, neighbours: int) -> dict:
        """One request's answer: its neighbours, links to their images, the saliency overlay when asked."""
        result = {**result, "similar": [dict(s) for s in result["similar"][:neighbours]]}
        for s in result["similar"]:
            s["image_url"] = f"/api/similar/{s['id']}/image" if s["id"] in self.known else None
        result["saliency_png"], result["saliency_note"] = self.saliency(pixels[None]) if saliency else (None, "")
        result["threshold_source"] = self.run.thresholds.source
        result["knn_k"] = self.run.config.evaluation.knn_k
        result["note"] = NOTE
        return result

    def saliency(self, pixels: np.ndarray) -> tuple[Optional[str], str]:
        """The Grad-CAM overlay as a PNG data URL, and a caption saying what it shows at this run's size."""
        from importlib.util import find_spec

        from .saliency import saliency_with_stage

        # Grad-CAM is an optional extra, imported by saliency only when a map is drawn.
        if find_spec("pytorch_grad_cam") is None:
            return None, "No saliency map: the Grad-CAM package is not installed on this server."
        with self.saliency_lock:
            found = saliency_with_stage(self.saliency_run, pixels)
        if not found.stage.useful:
            return None, f"No useful map at this size: {found.stage.describe()}."
        if not found.evidence[0]:
            return None, f"No region raised the melanoma score ({found.stage.describe()})."
        buffer = io.BytesIO()
        Image.fromarray(found.overlays[0]).save(buffer, format="PNG")
        caption = f"Red: what raised the melanoma score. {found.stage.describe()}."
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), caption

    def health(self) -> dict:
        run = self.run
        return {"status": "ok", "run": run.path.name, "backbone": run.encoder.args["backbone"],
                "models": int(run.encoder.args.get("members", 1)),  # K for a K-fold ensemble
                # On the scale of the probability the answers show (calibrated, at `prevalence`), as in an answer;
                # score_threshold is the same cut on the classifier's raw score.
                "image_size": run.config.data.image_size, "threshold": self.predictor.threshold,
                "score_threshold": run.thresholds.classifier,
                "threshold_source": run.thresholds.source, "knn_threshold": run.thresholds.knn,
                "index_size": int(len(run.index.ids)), "images_available": len(self.known),
                "train_melanoma_fraction": run.train_prevalence, "prevalence": self.predictor.prevalence,
                "prevalence_source": self.predictor.prevalence_source, "calibrated": run.calibration is not None,
                "trained_on_generated_images": run.generated, "note": NOTE}


def thumbnail_png(path: str, side: int = THUMBNAIL_SIDE) -> bytes:
    from .data.hdf5 import read_source

    source = read_source(path)
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.draft("RGB", (side, side))
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue()


class BodyLimit:
    """413 for a request body over `limit` bytes, by Content-Length or by counting what arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def message(self) -> str:
        # In the unit of --max-upload-mb: a byte count that includes the form's own headroom reads as a wrong limit.
        upload = (self.limit - MULTIPART_OVERHEAD) / 1024 / 1024
        return (f"request body over the limit: an upload may be at most {upload:g} MB (--max-upload-mb), plus "
                f"{MULTIPART_OVERHEAD // 1024} KB for the form around it ({self.limit} bytes in all)")

    async def __call__(self, scope, receive, send):
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": self.message()}, status_code=413)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # FastAPI passes an HTTPException raised while reading the form through as this status.
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counted, send)


def _filename_is_safe(name: Optional[str]) -> bool:
    if not name:
        return True
    return not ("/" in name or "\\" in name or "\x00" in name or name in (".", "..") or name.startswith(".."))


def _schemas() -> SimpleNamespace:
    """The API's response models (pydantic, imported with the optional [serve] extra)."""
    from pydantic import BaseModel

    class Similar(BaseModel):
        id: str
        label: int
        label_name: str
        distance: float
        image_url: Optional[str]

    class Unfamiliar(BaseModel):
        flag: bool  # by either rule
        distance: Optional[float]  # distance, percentile and cut: the embedding's rule
        percentile: Optional[float]
        cut: Optional[float]
        embedding_flag: bool
        appearance_flag: bool  # the texture rule
        appearance_percentile: Optional[float]  # share of validation images whose texture is as close or closer
        reason: str

    class KnownCase(BaseModel):
        id: str
        label_name: str
        note: str

    class Prediction(BaseModel):
        probability: float
        decision: str
        threshold: float
        threshold_source: str
        score: float
        score_threshold: float
        calibrated: bool
        prevalence: Optional[float]
        prevalence_source: str
        unfamiliar: Unfamiliar
        trained_on_generated_images: bool
        saliency_note: str
        knn_probability: float
        knn_decision: str
        knn_threshold: float
        knn_k: int
        similar: list[Similar]
        known_case: Optional[KnownCase] = None
        saliency_png: Optional[str]
        note: str

    return SimpleNamespace(Similar=Similar, Unfamiliar=Unfamiliar, KnownCase=KnownCase, Prediction=Prediction,
                           **_run_schemas())


def _run_schemas() -> dict:
    """The health answer's and the errors' models."""
    from pydantic import BaseModel

    class Health(BaseModel):
        status: str
        run: str
        backbone: str
        models: int  # 1, or K for a K-fold ensemble averaged in every answer
        image_size: int
        threshold: float  # on the scale of the probability the answers show
        score_threshold: float  # the same cut on the classifier's raw score
        threshold_source: str
        knn_threshold: float
        index_size: int
        images_available: int
        train_melanoma_fraction: Optional[float]
        prevalence: Optional[float]
        prevalence_source: str
        calibrated: bool
        trained_on_generated_images: bool
        max_upload_mb: float
        busy: dict
        note: str

    class Error(BaseModel):
        detail: str

    return {"Health": Health, "Error": Error}


def create_app(run_dir: Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, device: str = "cpu", options: Optional[dict] = None):
    """options: `prevalence` (None: the run's default), `token` (required on every route but health when
    set), `workers` and `queue` (requests decoded at once, and waiting beyond them), `max_batch` and
    `batch_wait_ms` (images scored in one forward pass, and how long to wait for requests still decoding)."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse

    from .admission import Admission, Busy, Quiet
    from .allocator import trim_freed_memory
    from .inference import load_run
    from .microbatch import MicroBatcher

    options = options or {}
    service = Service(load_run(run_dir, device), max_pixels, options.get("prevalence"))
    gate = Admission(options.get("workers", DEFAULT_WORKERS), options.get("queue", DEFAULT_QUEUE))
    # Freed memory goes back to the system once no request has been in the server for a moment, so the process
    # falls back after a burst of large uploads; not between back-to-back requests, because memory handed back
    # is slow to write again on a virtual machine and every forward pass would pay for it.
    quiet = Quiet(trim_freed_memory, IDLE_TRIM_S)
    batcher = MicroBatcher(service.answers, options.get("max_batch", DEFAULT_MAX_BATCH),
                           options.get("batch_wait_ms", DEFAULT_BATCH_WAIT_MS) / 1000, gate.queue + gate.limit,
                           expecting=lambda: gate.working + gate.waiting, retry_after=gate.retry_after)
    app_state = {"service": service, "gate": gate, "batcher": batcher}  # for the bench and the tests
    page = (resources.files("melanoma_siamese") / "web" / "index.html").read_text(encoding="utf-8")

    schemas = _schemas()
    errors = {code: {"model": schemas.Error} for code in (400, 401, 404, 413, 415, 422, 503)}
    # No /docs or /redoc: their pages load scripts from a CDN and are blank offline; /openapi.json stays.
    app = FastAPI(title="melanoma-siamese", version="0.1.0", description=NOTE, docs_url=None, redoc_url=None)
    for name, value in app_state.items():
        setattr(app.state, name, value)
    app.add_middleware(BodyLimit, limit=max_upload_bytes + MULTIPART_OVERHEAD)
    if options.get("token"):
        from .auth import BearerToken

        app.add_middleware(BearerToken, token=options["token"])

    @app.exception_handler(Busy)
    async def busy(request, exc: Busy):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> str:
        return page

    @app.get("/api/health", response_model=schemas.Health)
    async def health() -> dict:
        # Answered on the event loop itself: never behind the work it reports on.
        return {**service.health(), "max_upload_mb": max_upload_bytes / 1024 / 1024,
                "busy": {**gate.state(), **batcher.state()}}

    _prediction_route(app, service, (gate, batcher, quiet), max_upload_bytes, (schemas.Prediction, errors))
    _thumbnail_route(app, service, errors)
    from .serve_patient import patient_route

    patient_route(app, service, gate, max_upload_bytes)
    return app


def _prediction_route(app, service: Service, bounds: tuple, max_upload_bytes: int, models: tuple) -> None:
    """POST /api/predict. `bounds`: (admission.Admission over decoding, microbatch.MicroBatcher over scoring,
    admission.Quiet over the whole request)."""
    from fastapi import Depends, File, HTTPException, Query, UploadFile
    from fastapi.concurrency import run_in_threadpool

    from .inference import DEFAULT_NEIGHBOURS
    from .uploads import known_query, read_upload

    prediction, errors = models
    gate, batcher, quiet = bounds

    prevalence = ("the prevalence is the server's (serve --prevalence P), said in each answer; for another, run "
                  "predict --prevalence P")
    only = Depends(known_query("/api/predict", ("saliency", "neighbours"), prevalence))

    @app.post("/api/predict", response_model=prediction, responses=errors, dependencies=[only])
    async def predict(file: UploadFile = File(..., description="one image (JPEG, PNG, ...)"),
                      saliency: bool = Query(False, description="add a Grad-CAM overlay as a PNG data URL"),
                      neighbours: int = Query(DEFAULT_NEIGHBOURS, ge=1, le=MAX_NEIGHBOURS)) -> dict:
        if not _filename_is_safe(file.filename):
            raise HTTPException(400, "file name with a path in it; send the bare file name")
        async with quiet.request():
            data = await read_upload(file, max_upload_bytes)
            # Decoding (the memory a huge upload takes) is bounded by the gate; the small decoded image then joins
            # the batch being formed, and Grad-CAM, when asked, runs for this image alone.
            async with gate.slot():
                try:
                    pixels = await run_in_threadpool(service.decode, data)
                except ImageRejected as exc:
                    raise HTTPException(exc.status, str(exc)) from exc
            answer = await batcher.submit(pixels)
            return await run_in_threadpool(service.finish, answer, pixels, saliency, neighbours)


def _thumbnail_route(app, service: Service, errors: dict) -> None:
    from fastapi import HTTPException, Path as PathParam
    from fastapi.responses import Response

    thumbnail = lru_cache(maxsize=1024)(thumbnail_png)

    @app.get("/api/similar/{image_id}/image", response_class=Response, responses={
        200: {"content": {"image/png": {}}, "description": "a PNG thumbnail of a known lesion"}, **errors})
    def similar_image(image_id: str = PathParam(..., pattern=ID_PATTERN, max_length=128)) -> Response:
        # Only ids of the retrieval index are served, from the paths recorded for them: never a path built
        # from the request.
        path = service.known.get(image_id)
        if path is None:
            raise HTTPException(404, f"no known image with id {image_id!r}")
        try:
            return Response(thumbnail(path), media_type="image/png")
        except (OSError, ValueError, KeyError, Image.DecompressionBombError) as exc:  # KeyError: gone from HDF5
            raise HTTPException(404, f"the image of {image_id} can no longer be read") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from .auth import TOKEN_ENV, is_loopback
    from .errors import ConfigError

    token = args.token or os.environ.get(TOKEN_ENV)
    if not is_loopback(args.host) and not token:
        raise ConfigError(f"--host {args.host} is reachable from other machines, and the page shows patients' "
                          f"training images: give a token with --token or the {TOKEN_ENV} environment variable "
                          "(clients send 'Authorization: Bearer TOKEN'; the page opens as /?token=TOKEN)")
    options = {"prevalence": args.prevalence, "token": token, "workers": args.workers, "queue": args.queue,
               "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms}
    app = create_app(args.run, int(args.max_upload_mb * 1024 * 1024), max_pixels_option(args.max_megapixels),
                     args.device, options)
    print(f"Open http://{args.host}:{args.port}/" + ("?token=TOKEN" if token else "")
          + " (API schema at /openapi.json)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("serve", help="web page and HTTP API over a trained run")
    parser.add_argument("--run", type=Path, required=True, help="run folder written by train")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 1024 / 1024,
                        help="largest accepted upload in MB (default 20)")
    parser.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_PIXELS / 1e6,
                        help="refuse images whose header claims more pixels than this (default 64)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--prevalence", type=float, metavar="P",
                        help="share of melanoma in the population the probability is for (default: the training "
                             "part's)")
    parser.add_argument("--token", help="required from clients (Authorization: Bearer TOKEN) on every route but "
                                        "/api/health; needed when --host is not a loopback address (or set "
                                        "MELANOMA_SIAMESE_TOKEN)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"uploads decoded at once (default {DEFAULT_WORKERS})")
    parser.add_argument("--queue", type=int, default=DEFAULT_QUEUE,
                        help=f"requests waiting beyond those; more get 503 with Retry-After (default {DEFAULT_QUEUE})")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"concurrent requests scored in one forward pass (default {DEFAULT_MAX_BATCH}; 1: one at "
                             "a time)")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                        help="how long a batch waits for requests still being decoded (default "
                             f"{DEFAULT_BATCH_WAIT_MS:g}; a lone request never waits)")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    parser.set_defaults(handler=cmd_serve)
