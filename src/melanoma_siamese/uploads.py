"""What the API routes that take images read from a request: one uploaded file within the server's size limit,
and only the query parameters a route knows."""


async def read_upload(file, max_upload_bytes: int) -> bytes:
    """An uploaded file's bytes; 413 over the limit (read no further than one byte past it), 400 when empty."""
    from fastapi import HTTPException

    data = await file.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise HTTPException(413, f"file over the upload limit of {max_upload_bytes / 1024 / 1024:g} MB")
    if not data:
        raise HTTPException(400, "empty file")
    return data


def known_query(route: str, names: tuple[str, ...], hint: str = ""):
    """A FastAPI dependency: 422 for a query parameter `route` does not take. FastAPI ignores unknown ones, so
    `?prevalence=0.02` would be answered at the server's own prevalence while the caller believes otherwise."""
    from fastapi import HTTPException, Request

    allowed = set(names) | {"token"}  # the page may carry its token in the query (auth.py)

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            takes = ", ".join(names) if names else "no query parameters"
            raise HTTPException(422, f"{route} does not take {', '.join(map(repr, unknown))}; it takes {takes}"
                                     + (f". {hint}" if hint else ""))
    return check
