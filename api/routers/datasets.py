"""Preference, prompt and SFT datasets: validated whole, stored whole or not at all."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool

from api import formats
from api.db import release, run_db
from api.deps import Annotator, Reader, SessionDep
from api.errors import ApiError, not_found, responses
from api.limits import InvalidJson, is_json, loads, text_problem
from api.pagination import IndexCursor, IdCursor, Limit, listing, page
from api.registry import create_dataset_rows
from api.settings import get_settings
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


COLUMN_MAP = {"type": "object", "maxProperties": formats.COLUMN_MAP_MAX, "additionalProperties": {"type": "string"},
              "description": 'A file\'s column → the record field it is, e.g. {"question": "prompt"}.'}
_FIELDS = {"name": {"type": "string", "minLength": 1, "maxLength": NAME_MAX},
           "kind": {"type": "string", "enum": list(KINDS)}}
UPLOAD_BODY = {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["name", "kind", "records"], "properties": {
        **_FIELDS, "column_map": COLUMN_MAP,
        "records": {"type": "array", "minItems": 1, "items": {"type": "object"},
                    "description": "Records of the kind's schema (PKU-SafeRLHF for preference)."}}}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["name", "kind", "file"], "properties": {
        **_FIELDS,
        "file": {"type": "string", "format": "binary", "description": "JSONL (one record a line), Parquet, or a tar "
                 "or zip of a folder written by datasets' save_to_disk; told apart by their first bytes."},
        "column_map": {"type": "string", "maxLength": 65536, "description": "JSON text of " + COLUMN_MAP["description"]},
        "split": {"type": "string", "maxLength": NAME_MAX,
                  "description": "The split of a save_to_disk DatasetDict archive (its folder's name)."}}}},
}}


@router.post("", status_code=201, openapi_extra={"requestBody": UPLOAD_BODY},
             responses=responses(403, 415))
async def create_dataset(request: Request, session: SessionDep, key: Annotator) -> dict:
    """Upload a dataset as JSON ``{name, kind, records}`` or multipart (``file``: JSONL, Parquet, or a tar or
    zip of a ``save_to_disk`` folder; ``name``, ``kind``, optional ``column_map`` and ``split``); the whole
    request is limited to BEAVER_MAX_UPLOAD_MB (413 as soon as it is passed), and so is the data a
    Parquet or Arrow file decodes to. A ``line`` in an error is a JSONL line or a row (from 1)."""
    await release(session)  # the key is checked; no database session held while a large body arrives
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()  # the file part spools to disk; api.limits bounds the whole request
        name, kind, upload = form.get("name"), form.get("kind"), form.get("file")
        name = check_name(name)
        _check_kind(kind)
        column_map = formats.parse_column_map(form.get("column_map"))
        split = form.get("split") or None
        if split is not None:
            split = check_name(split, "split")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "multipart upload needs a 'file' part (JSONL, Parquet or a save_to_disk archive)",
                           param="file")
        head = await upload.read(512)
        await upload.seek(0)
        fmt = formats.sniff(head, upload.filename or "", upload.content_type or "")
        limit = get_settings().max_upload_bytes
        if fmt == "parquet":  # decoding is CPU work: off the event loop
            records, errors, lines = await run_in_threadpool(formats.read_parquet, upload.file, limit, column_map)
        elif fmt == "archive":
            records, errors, lines = await run_in_threadpool(formats.read_saved_dataset, upload.file, limit,
                                                             column_map, split)
        else:
            records, errors, lines = parse_jsonl(await upload.read())
            records = [formats.rename_record(r, column_map) for r in records]
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
        column_map = formats.parse_column_map(body.get("column_map"))
        records = [formats.rename_record(r, column_map) for r in records]
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



EXPORT_CHUNK = 2000  # records read per database session while an export streams
EXPORT_RESPONSES = {**responses(404), 200: {"description": "The records as JSONL or Parquet", "content": {
    "application/x-ndjson": {}, "application/vnd.apache.parquet": {}}}}


def _read_chunk(session: Session, dataset_id: str, after: int) -> list[tuple[int, dict]]:
    rows = session.exec(select(DatasetRecord.idx, DatasetRecord.data).where(
        DatasetRecord.dataset_id == dataset_id, DatasetRecord.idx > after)
        .order_by(DatasetRecord.idx).limit(EXPORT_CHUNK))
    return list(rows)


async def _chunks(dataset_id: str):
    """The dataset's records, ``EXPORT_CHUNK`` at a time, each read in a short session of its own."""
    after = -1
    while True:
        rows = await run_db(_read_chunk, dataset_id, after)
        if not rows:
            return
        after = rows[-1][0]
        yield [data for _, data in rows]


async def _jsonl(dataset_id: str):
    async for chunk in _chunks(dataset_id):
        yield "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk).encode()


async def _parquet(dataset_id: str, pa, schema):
    import pyarrow.parquet as pq

    sink = formats.Chunks()
    writer = pq.ParquetWriter(sink, schema)
    async for chunk in _chunks(dataset_id):  # a row group per chunk, sent as soon as it is written
        table = await run_in_threadpool(pa.Table.from_pylist, chunk, schema)
        await run_in_threadpool(writer.write_table, table)
        yield sink.take()
    writer.close()
    yield sink.take()


@router.get("/{dataset_id}/export", response_model=None, response_class=StreamingResponse,
            responses=EXPORT_RESPONSES)
async def export_dataset(dataset_id: str, session: SessionDep, _: Reader,
                         format: Literal["jsonl", "parquet"] = "jsonl") -> StreamingResponse:
    """A dataset's records, streamed, as JSONL (one record a line, as uploaded) or Parquet (one row group
    per few thousand records; what ``datasets.load_dataset("parquet", …)`` and pandas read)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in dataset.name)[:100] or dataset.id
    await release(session)  # each chunk takes a short session of its own
    if format == "jsonl":
        return StreamingResponse(_jsonl(dataset_id), media_type="application/x-ndjson",
                                 headers={"Content-Disposition": f'attachment; filename="{name}.jsonl"'})
    pa = formats.require_pyarrow()
    schema = None  # Parquet's schema comes first: one pass to learn it, one to write
    async for chunk in _chunks(dataset_id):
        schema = await run_in_threadpool(formats.unify, pa, schema, chunk)
    return StreamingResponse(_parquet(dataset_id, pa, schema), media_type="application/vnd.apache.parquet",
                             headers={"Content-Disposition": f'attachment; filename="{name}.parquet"'})
