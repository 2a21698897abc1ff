"""Preference, prompt and SFT datasets: validated whole, stored whole or not at all."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from sqlmodel import select

from api.deps import Annotator, Reader, SessionDep
from api.errors import ApiError, not_found
from api.pagination import listing, page
from api.settings import get_settings
from api.registry import create_dataset_rows
from api.tables import Dataset, DatasetRecord, public
from models.records import KINDS, RecordError, validate_records

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it grows past ``limit`` (Content-Length may be absent or lie)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"upload of {size} bytes exceeds the limit of {limit} bytes (BEAVER_MAX_UPLOAD_MB)")


def parse_jsonl(raw: bytes) -> tuple[list, list[RecordError], list[int]]:
    """Records of a JSONL file, JSON errors by line, and each record's line number."""
    records, errors, lines = [], [], []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(422, f"file is not UTF-8 text: {e}", param="file") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            lines.append(number)
        except json.JSONDecodeError as e:
            errors.append(RecordError(number, None, f"invalid JSON: {e.msg} at column {e.colno}"))
    return records, errors, lines


def _check_name_kind(name, kind) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ApiError(422, "name must be a non-empty string", param="name")
    if kind not in KINDS:
        raise ApiError(422, f"kind must be one of {', '.join(KINDS)}, got {kind!r}", param="kind")


@router.post("", status_code=201)
async def create_dataset(request: Request, session: SessionDep, key: Annotator) -> dict:
    """Upload a dataset as JSON ``{name, kind, records}`` or multipart (``file`` JSONL, ``name``, ``kind``)."""
    limit = get_settings().max_upload_bytes
    content_type = request.headers.get("content-type", "")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:  # refuse before reading a byte
        raise _too_large(int(length), limit)
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_part_size=limit + 1)
        name, kind, upload = form.get("name"), form.get("kind"), form.get("file")
        _check_name_kind(name, kind)
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "multipart upload needs a 'file' part with JSONL records", param="file")
        raw = await upload.read()
        if len(raw) > limit:
            raise _too_large(len(raw), limit)
        records, errors, lines = parse_jsonl(raw)
    elif content_type.startswith("application/json") or not content_type:
        raw = await _read_limited(request, limit)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(body, dict):
            raise ApiError(422, "body must be an object {name, kind, records}")
        name, kind, records = body.get("name"), body.get("kind"), body.get("records")
        _check_name_kind(name, kind)
        if not isinstance(records, list):
            raise ApiError(422, "records must be a list of objects", param="records")
        errors, lines = [], list(range(1, len(records) + 1))
    else:
        raise ApiError(415, f"unsupported content type {content_type!r}: send application/json or multipart/form-data")

    if not records and not errors:
        raise ApiError(422, "a dataset needs at least one record", param="records")
    for record, line in zip(records, lines):
        errors.extend(validate_records(kind, [record], first_line=line))
    if errors:
        errors.sort(key=lambda e: e.line)
        first = errors[0]
        raise ApiError(422, f"{len(errors)} invalid record(s); first: {first}", param=first.field,
                       details=[{"line": e.line, "field": e.field, "message": e.message} for e in errors[:1000]])

    dataset = create_dataset_rows(session, name.strip(), kind, records, created_by=key.id)
    return public(dataset, "dataset")


@router.get("")
def list_datasets(session: SessionDep, _: Reader, after: str | None = None, limit: int = 20) -> dict:
    """List datasets, newest first."""
    rows, has_more = page(session, select(Dataset), Dataset.id, after, limit)
    return listing([public(r, "dataset") for r in rows], has_more)


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, session: SessionDep, _: Reader) -> dict:
    """One dataset with its statistics."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return public(dataset, "dataset")


@router.get("/{dataset_id}/records")
def list_records(dataset_id: str, session: SessionDep, _: Reader, after: int | None = None, limit: int = 100) -> dict:
    """A dataset's records in upload order; ``after`` is the last index seen."""
    if session.get(Dataset, dataset_id) is None:
        raise not_found("dataset", dataset_id)
    stmt = select(DatasetRecord).where(DatasetRecord.dataset_id == dataset_id)
    rows, has_more = page(session, stmt, DatasetRecord.idx, after, limit, descending=False)
    return listing([{"object": "record", "index": r.idx, "data": r.data} for r in rows], has_more)

