"""Dataset files besides JSONL: Parquet and a ``datasets`` folder made by ``save_to_disk`` in, Parquet
out — what the Hugging Face hub ships (PKU-SafeRLHF is Parquet) and what ``datasets`` writes.

Uploads become the same Python records as a JSONL upload, for the same validation
(``models.records``) and the same all-or-nothing storage. What bounds them:

- the request: ``BEAVER_MAX_UPLOAD_MB``, counted as it streams in (``api.limits``);
- the data it decodes to: Parquet and Arrow compress, so the Arrow bytes decoded from a file (a row
  group's declared size checked before it is read, its real size after) may be at most the same
  ``BEAVER_MAX_UPLOAD_MB`` — a small file cannot unpack into gigabytes, and a Parquet upload holds at
  most about what a JSONL upload could;
- a ``save_to_disk`` folder comes as a tar (plain or gzip) or zip of the folder. Nothing is unpacked
  to disk: the Arrow files named by its ``state.json`` are read from the archive in memory, by name,
  each read bounded by what is left of the budget, so no member's path can point anywhere.

Arrow's ``null`` is JSON's: a null column value is an absent field (a Parquet file has every column in
every row), except where the kind's schema gives null a meaning of its own (a preference's tie).
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
import zipfile
from typing import Any, BinaryIO, Iterator

from api.errors import ApiError
from api.limits import json_problem
from models.records import NULLABLE_FIELDS, RecordError

PARQUET_MAGIC = b"PAR1"
ZIP_MAGIC = b"PK\x03\x04"
GZIP_MAGIC = b"\x1f\x8b"
COLUMN_MAP_MAX = 64  # renamed columns; each name at most NAME_MAX characters
NAME_MAX = 200
EXPORT_FORMATS = ("jsonl", "parquet")


class DecodedTooLarge(ApiError):
    def __init__(self, limit: int, what: str):
        super().__init__(413, f"{what} decodes to more than the limit of {limit} bytes (BEAVER_MAX_UPLOAD_MB): "
                              "upload fewer records at a time")


def require_pyarrow():
    """pyarrow, imported only when a Parquet or Arrow file comes (it is a dependency of Beaver's)."""
    import pyarrow
    import pyarrow.ipc  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    return pyarrow


# --- what an upload is -------------------------------------------------------------------------------


def sniff(head: bytes, filename: str = "", content_type: str = "") -> str:
    """``jsonl``, ``parquet`` or ``archive`` (a tar or zip of a ``save_to_disk`` folder), by the file's
    first bytes; the name and content type only break the tie of a file too short to tell."""
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(ZIP_MAGIC) or head.startswith(GZIP_MAGIC) or head[257:262] == b"ustar":
        return "archive"
    name = filename.lower()
    if name.endswith(".parquet") or "parquet" in content_type:
        return "parquet"  # and its reader says what is wrong with it
    if name.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
        return "archive"
    return "jsonl"


def parse_column_map(raw: Any) -> dict[str, str]:
    """``{"question": "prompt"}``: a file's column → the record field it is. Given as a JSON object (or
    its text, in a form field)."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError(422, f"column_map is not valid JSON: {e.msg}", param="column_map") from None
    if not isinstance(raw, dict):
        raise ApiError(422, 'column_map must be an object {"file column": "record field"}', param="column_map")
    if len(raw) > COLUMN_MAP_MAX:
        raise ApiError(422, f"column_map has {len(raw)} entries; at most {COLUMN_MAP_MAX}", param="column_map")
    for source, target in raw.items():
        if not isinstance(target, str) or not target or not source:
            raise ApiError(422, "column_map's names must be non-empty strings", param="column_map")
        if len(source) > NAME_MAX or len(target) > NAME_MAX:
            raise ApiError(422, f"column_map's names are at most {NAME_MAX} characters", param="column_map")
        if json_problem(source) or json_problem(target):
            raise ApiError(422, "column_map's names must be plain text (no NUL)", param="column_map")
    targets = list(raw.values())
    if len(set(targets)) != len(targets):
        raise ApiError(422, "column_map maps two columns to the same field", param="column_map")
    return raw


def renamed(names: list[str], column_map: dict[str, str]) -> list[str]:
    """The columns of a file once ``column_map`` renames them; 422 when it names a column the file
    lacks or renames one onto a column that stays."""
    missing = [c for c in column_map if c not in names]
    if missing:
        raise ApiError(422, f"column_map names column {missing[0]!r}, which the file does not have (it has "
                            f"{', '.join(names[:20])})", param="column_map")
    out = [column_map.get(n, n) for n in names]
    if len(set(out)) != len(out):
        clash = next(n for n in out if out.count(n) > 1)
        raise ApiError(422, f"column_map renames a column to {clash!r}, which the file already has", param="column_map")
    return out


def rename_record(record: Any, column_map: dict[str, str]) -> Any:
    """A JSONL record's fields renamed by ``column_map`` (a record without a mapped field keeps its own)."""
    if not column_map or not isinstance(record, dict):
        return record
    return {column_map.get(k, k): v for k, v in record.items()}


# --- Arrow tables to records ---------------------------------------------------------------------------


def _type_problem(pa, t) -> str | None:
    """Why an Arrow type cannot be a JSON value, or None."""
    types = pa.types
    if (types.is_string(t) or types.is_large_string(t) or types.is_boolean(t) or types.is_integer(t)
            or types.is_floating(t) or types.is_null(t)):
        return None
    if types.is_dictionary(t):  # a categorical column (pandas): its values decide
        return _type_problem(pa, t.value_type)
    if types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t):
        return _type_problem(pa, t.value_type)
    if types.is_struct(t):
        for i in range(t.num_fields):
            if (problem := _type_problem(pa, t.field(i).type)) is not None:
                return problem
        return None
    return f"has type {t}, which a JSON record cannot hold (text, numbers, booleans, lists and structs can)"


def check_schema(pa, schema) -> None:
    for f in schema:
        if (problem := _type_problem(pa, f.type)) is not None:
            raise ApiError(422, f"column {f.name!r} {problem}", param=f.name)


def batch_records(batch, first_row: int, errors: list[RecordError]) -> list[dict]:
    """The rows of an Arrow table or record batch as records: null fields dropped (but the kind's
    meaningful nulls), and each row checked as JSON Beaver can store (NaN, NUL, 64-bit integers)."""
    records = []
    for i, row in enumerate(batch.to_pylist()):
        record = {k: v for k, v in row.items() if v is not None or k in NULLABLE_FIELDS}
        if (problem := json_problem(record)) is not None:
            errors.append(RecordError(first_row + i, problem[0], problem[1]))
        records.append(record)
    return records


class Budget:
    """Decoded bytes left of ``limit``; ``spend`` raises ``DecodedTooLarge`` once they run out."""

    def __init__(self, limit: int, what: str):
        self.limit, self.left, self.what = limit, limit, what

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise DecodedTooLarge(self.limit, self.what)


def read_parquet(file: BinaryIO, limit: int, column_map: dict[str, str]) -> tuple[list, list[RecordError], list[int]]:
    """Records of a Parquet file read one row group at a time, JSON problems by row (1-based), and
    each record's row: the shape of ``parse_jsonl``'s answer."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise ApiError(422, f"file is not a readable Parquet file: {e}", param="file") from None
    schema = parquet.schema_arrow
    check_schema(pa, schema)
    names = renamed(schema.names, column_map)
    budget = Budget(limit, "the Parquet file")
    records, errors = [], []
    metadata = parquet.metadata
    for group in range(metadata.num_row_groups):
        declared = metadata.row_group(group)
        if max(declared.total_byte_size, sum(declared.column(c).total_uncompressed_size
                                             for c in range(declared.num_columns))) > budget.left:
            raise DecodedTooLarge(limit, "the Parquet file")
        try:
            table = parquet.read_row_group(group)
        except (pa.ArrowException, OSError) as e:
            raise ApiError(422, f"file is not a readable Parquet file: row group {group}: {e}", param="file") from None
        budget.spend(table.nbytes)
        records.extend(batch_records(table.rename_columns(names), len(records) + 1, errors))
    return records, errors, list(range(1, len(records) + 1))


# --- a save_to_disk folder, archived ---------------------------------------------------------------------


def _members(file: BinaryIO, limit: int) -> tuple[dict[str, Any], Any]:
    """Name → member of a tar or zip archive (names normalised: no ``./``), and a function reading a
    member's bytes with a bound. Nothing is written to disk. A tar's members may declare at most
    ``limit`` bytes in all: walking a gzip tar decompresses every member it passes."""
    file.seek(0)
    head = file.read(4)
    file.seek(0)
    if head.startswith(ZIP_MAGIC):
        try:
            archive = zipfile.ZipFile(file)
        except zipfile.BadZipFile as e:
            raise ApiError(422, f"file is not a readable zip archive: {e}", param="file") from None
        members = {posixpath.normpath(i.filename): i for i in archive.infolist() if not i.is_dir()}

        def read(info, bound: int) -> bytes:
            with archive.open(info) as f:
                return f.read(bound + 1)

        return members, read
    try:
        archive = tarfile.open(fileobj=file, mode="r:*")
        members, budget = {}, Budget(limit, "the archive")
        for member in archive:
            budget.spend(member.size)
            if member.isfile():
                members[posixpath.normpath(member.name)] = member
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ApiError(422, f"file is not a readable tar archive: {e}", param="file") from None

    def read(member, bound: int) -> bytes:
        return archive.extractfile(member).read(bound + 1)

    return members, read


def read_saved_dataset(file: BinaryIO, limit: int, column_map: dict[str, str],
                       split: str | None) -> tuple[list, list[RecordError], list[int]]:
    """Records of a ``save_to_disk`` folder sent as a tar or zip: the Arrow files its ``state.json``
    lists, in order. A ``DatasetDict`` (one folder per split) needs ``split``."""
    pa = require_pyarrow()
    members, read = _members(file, limit)
    folders = sorted(posixpath.dirname(name) for name in members if posixpath.basename(name) == "state.json")
    if not folders:
        raise ApiError(422, "the archive holds no save_to_disk folder (no state.json): archive the folder that "
                            "Dataset.save_to_disk wrote", param="file")
    splits = {posixpath.basename(f) or ".": f for f in folders}
    if split is not None:
        if split not in splits:
            raise ApiError(422, f"split {split!r} is not in the archive; it has {', '.join(sorted(splits))}",
                           param="split")
        folder = splits[split]
    elif len(folders) == 1:
        folder = folders[0]
    else:
        raise ApiError(422, f"the archive holds several splits ({', '.join(sorted(splits))}): name one in 'split'",
                       param="split")
    budget = Budget(limit, "the archive")
    state_member = members[posixpath.join(folder, "state.json") if folder else "state.json"]
    raw = read(state_member, 1 << 20)
    try:
        state = json.loads(raw[: 1 << 20])
        files = [f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise ApiError(422, "the save_to_disk folder's state.json is not what datasets writes (no _data_files)",
                       param="file") from None
    records, errors, schema_names = [], [], None
    for filename in files:
        # A plain file name inside the split's folder, looked up among the archive's members: never a path.
        if not isinstance(filename, str) or "/" in filename or "\\" in filename or filename in ("", ".", ".."):
            raise ApiError(422, f"state.json names a data file {str(filename)[:100]!r} that is not a plain file name",
                           param="file")
        member = members.get(posixpath.join(folder, filename) if folder else filename)
        if member is None:
            raise ApiError(422, f"state.json names {filename!r}, which the archive does not hold", param="file")
        data = read(member, budget.left)
        budget.spend(len(data))
        for batch in _arrow_batches(pa, data, filename):
            if schema_names is None:
                check_schema(pa, batch.schema)
                schema_names = renamed(batch.schema.names, column_map)
            budget.spend(batch.nbytes)
            records.extend(batch_records(batch.rename_columns(schema_names), len(records) + 1, errors))
    return records, errors, list(range(1, len(records) + 1))


def _arrow_batches(pa, data: bytes, filename: str) -> Iterator:
    """The record batches of an Arrow IPC stream (what ``save_to_disk`` writes) or file."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_file(pa.py_buffer(data))
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        except pa.ArrowException as e:
            raise ApiError(422, f"{filename} is not an Arrow file: {e}", param="file") from None
    try:
        yield from reader
    except pa.ArrowException as e:
        raise ApiError(422, f"{filename} is not a readable Arrow stream: {e}", param="file") from None


# --- out: Parquet ----------------------------------------------------------------------------------------


class Chunks(io.RawIOBase):
    """A write-only file whose bytes are taken out as they come, so a Parquet file streams as it is
    written (its footer last) instead of being built whole in memory."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        self.parts.append(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def unify(pa, schema, chunk: list[dict]):
    """``schema`` widened to hold ``chunk`` too: records may differ in their fields (absent in some, a
    struct with other keys). 422 when they cannot agree (a field text in some records, a list in others)."""
    try:
        inferred = pa.Table.from_pylist(chunk).schema
        return inferred if schema is None else pa.unify_schemas([schema, inferred], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ApiError(422, f"the records' fields differ in type, which one Parquet schema cannot hold ({e}): "
                            "export as jsonl", param="format") from None
