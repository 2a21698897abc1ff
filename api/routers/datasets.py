"""Preference, prompt and SFT datasets: validated whole, stored whole or not at all."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlmodel import Session, select

from api.db import release, run_db
from api.deps import Annotator, Reader, SessionDep
from api.errors import ApiError, not_found, responses
from api.limits import InvalidJson, is_json, loads, text_problem
from api.pagination import IndexCursor, IdCursor, Limit, listing, page
from api.registry import create_dataset_rows
from api.tables import Dataset, DatasetRecord, public
from models.records import KINDS, RecordError, jsonl_lines, validate_records

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=responses(400, 401, 413, 422))

NAME_MAX = 200  # characters; names are indexed, and PostgreSQL's btree refuses entries over ~2.7 kB


def parse_jsonl(raw: bytes) -> tuple[list, list[RecordError], list[int]]:
    """Records of a JSONL file, JSON errors by line, and each record's line number."""
    records, errors, lines = [], [], []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(422, f"file is not UTF-8 text: {e}", param="file") from None
    for number, line in jsonl_lines(text):
        if not line.strip():
            continue
        try:
            records.append(loads(line, what="the line"))
            lines.append(number)
        except InvalidJson as e:
            errors.append(RecordError(number, e.param, e.message if e.syntax else e.reason))
    return records, errors, lines


def check_name(name, param: str = "name") -> str:
    if not isinstance(name, str) or not name.strip():
        raise ApiError(422, f"{param} must be a non-empty string", param=param)
    if len(name) > NAME_MAX:
        raise ApiError(422, f"{param} is {len(name)} characters long; at most {NAME_MAX}", param=param)
    if (problem := text_problem(name)) is not None:
        raise ApiError(422, f"{param} {problem}", param=param)
    return name.strip()


def _check_kind(kind) -> None:
    if kind not in KINDS:
        raise ApiError(422, f"kind must be one of {', '.join(KINDS)}, got {str(kind)[:100]!r}", param="kind")


_FIELDS = {"name": {"type": "string", "minLength": 1, "maxLength": NAME_MAX},
           "kind": {"type": "string", "enum": list(KINDS)}}
UPLOAD_BODY = {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["name", "kind", "records"], "properties": {
        **_FIELDS, "records": {"type": "array", "minItems": 1, "items": {"type": "object"},
                               "description": "Records of the kind's schema (PKU-SafeRLHF for preference)."}}}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["name", "kind", "file"], "properties": {
        **_FIELDS, "file": {"type": "string", "format": "binary", "description": "JSONL, one record a line."}}}},
}}


@router.post("", status_code=201, openapi_extra={"requestBody": UPLOAD_BODY},
             responses=responses(403, 415))
async def create_dataset(request: Request, session: SessionDep, key: Annotator) -> dict:
    """Upload a dataset as JSON ``{name, kind, records}`` or multipart (``file`` JSONL, ``name``, ``kind``);
    the whole request is limited to BEAVER_MAX_UPLOAD_MB (413 as soon as it is passed)."""
    await release(session)  # the key is checked; no database session held while a large body arrives
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()  # the file part spools to disk; api.limits bounds the whole request
        name, kind, upload = form.get("name"), form.get("kind"), form.get("file")
        name = check_name(name)
        _check_kind(kind)
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "multipart upload needs a 'file' part with JSONL records", param="file")
        records, errors, lines = parse_jsonl(await upload.read())
    elif is_json(request.headers):
        try:
            body = loads(await request.body())
        except InvalidJson as e:
            raise e.as_api_error() from None
        if not isinstance(body, dict):
            raise ApiError(422, "body must be an object {name, kind, records}")
        name, kind, records = body.get("name"), body.get("kind"), body.get("records")
        name = check_name(name)
        _check_kind(kind)
        if not isinstance(records, list):
            raise ApiError(422, "records must be a list of objects", param="records")
        errors, lines = [], list(range(1, len(records) + 1))
    else:
        raise ApiError(415, f"unsupported content type {content_type[:100]!r}: send application/json or "
                       "multipart/form-data")

    if not records and not errors:
        raise ApiError(422, "a dataset needs at least one record", param="records")
    for record, line in zip(records, lines):
        errors.extend(validate_records(kind, [record], first_line=line))
    if errors:
        errors.sort(key=lambda e: e.line)
        first = errors[0]
        raise ApiError(422, f"{len(errors)} invalid record(s); first: {first}", param=first.field,
                       details=[{"line": e.line, "field": e.field, "message": e.message} for e in errors[:1000]])

    def store(session: Session) -> dict:  # in a worker thread: a 100k-record insert must not stop the event loop
        return public(create_dataset_rows(session, name, kind, records, created_by=key.id), "dataset")

    return await run_db(store)  # a session only now, not while the body streams in


@router.get("")
def list_datasets(session: SessionDep, _: Reader, after: IdCursor = None, limit: Limit = 20) -> dict:
    """List datasets, newest first."""
    rows, has_more = page(session, select(Dataset), Dataset.id, after, limit)
    return listing([public(r, "dataset") for r in rows], has_more)


@router.get("/{dataset_id}", responses=responses(404))
def get_dataset(dataset_id: str, session: SessionDep, _: Reader) -> dict:
    """One dataset with its statistics."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return public(dataset, "dataset")


@router.get("/{dataset_id}/records", responses=responses(404))
def list_records(dataset_id: str, session: SessionDep, _: Reader, after: IndexCursor = None, limit: Limit = 100) -> dict:
    """A dataset's records in upload order; ``after`` is the last index seen."""
    if session.get(Dataset, dataset_id) is None:
        raise not_found("dataset", dataset_id)
    stmt = select(DatasetRecord).where(DatasetRecord.dataset_id == dataset_id)
    rows, has_more = page(session, stmt, DatasetRecord.idx, after, limit, descending=False)
    return listing([{"object": "record", "index": r.idx, "data": r.data} for r in rows], has_more)

