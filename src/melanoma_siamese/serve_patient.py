"""POST /api/patient and the /patient page: several images of one patient in one request, scored together so
each lesion's patient context (how much it stands out from the patient's other lesions) is used; the answers
come back ordered by how much each lesion stands out."""
# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time.
from importlib import resources
from typing import List, Optional

import numpy as np

from .errors import ImageRejected

MAX_IMAGES = 32


def _ordered(answers: list[dict], names: list[str]) -> list[dict]:
    """Each answer with its file name; the patient's lesions by rank (1 = stands out most), then the rest."""
    out = [{"filename": name, **answer} for name, answer in zip(names, answers)]
    return sorted(out, key=lambda a: (a["patient"]["patient_rank"] is None, a["patient"]["patient_rank"] or 0))


def _clinical_fields(age: Optional[float], sex: str, site: str):
    """The form's age, sex and site in a dataset's vocabulary (one row); empty fields are missing. A value the
    vocabulary does not know is refused (422), not taken as missing: the caller believes the answer used it."""
    import pandas as pd
    from fastapi import HTTPException

    from .data.clinical import clinical_columns, expected_values

    given = clinical_columns(pd.DataFrame({"age": [age], "sex": [sex], "site": [site]}), "request")
    # Words for "not recorded" (unknown, n/a) are understood: they stay missing.
    for field, value in (("age", age), ("sex", sex), ("site", site)):
        if field in given.not_understood:
            raise HTTPException(422, f"form field '{field}': {value!r} is not understood; expected "
                                     f"{expected_values(field)}, or leave it out")
    return given.table


def patient_route(app, service, gate, max_upload_bytes: int) -> None:
    """Adds POST /api/patient (files, with optional age, sex and site of the patient) and GET /patient."""
    import pandas as pd
    from fastapi import Depends, File, Form, HTTPException, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse

    from .context import score_patient
    from .uploads import known_query, read_upload

    page = (resources.files("melanoma_siamese") / "web" / "patient.html").read_text(encoding="utf-8")

    @app.get("/patient", response_class=HTMLResponse, include_in_schema=False)
    def patient_page() -> str:
        return page

    @app.post("/api/patient", dependencies=[Depends(known_query("/api/patient", ()))])
    async def patient(files: List[UploadFile] = File(..., description="2 or more images of one patient"),
                      age: Optional[float] = Form(None), sex: str = Form(""), site: str = Form("")) -> dict:
        if not 1 <= len(files) <= MAX_IMAGES:
            raise HTTPException(400, f"send 1 to {MAX_IMAGES} images of one patient; got {len(files)}")
        given = _clinical_fields(age, sex, site)
        images, names = [], []
        async with gate.slot():
            for file in files:
                try:
                    data = await read_upload(file, max_upload_bytes)
                except HTTPException as exc:
                    raise HTTPException(exc.status_code, f"{file.filename}: {exc.detail}") from exc
                try:
                    images.append(await run_in_threadpool(service.decode, data))
                except ImageRejected as exc:
                    raise HTTPException(exc.status, f"{file.filename}: {exc}") from exc
                names.append(file.filename or f"image {len(names) + 1}")
            table = pd.DataFrame({"patient_id": "patient", **{c: given[c].iloc[0] for c in ("age", "sex", "site")}},
                                 index=range(len(images)))
            answers = await run_in_threadpool(score_patient, service.predictor, np.stack(images), table, 3)
        return {"images": len(images), "features": list(service.run.features),
                "uses_patient_context": "patient" in service.run.features, "lesions": _ordered(answers, names),
                "note": "Ordered by how far each lesion's embedding is from the mean of the patient's other lesions "
                        "(1 = stands out most). Research tool, not a diagnosis."}
