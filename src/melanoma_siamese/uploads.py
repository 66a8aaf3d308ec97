"""Reading one uploaded file within the server's size limit (both API routes that take images)."""


async def read_upload(file, max_upload_bytes: int) -> bytes:
    """An uploaded file's bytes; 413 over the limit (read no further than one byte past it), 400 when empty."""
    from fastapi import HTTPException

    data = await file.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise HTTPException(413, f"file over the upload limit of {max_upload_bytes / 1024 / 1024:g} MB")
    if not data:
        raise HTTPException(400, "empty file")
    return data
