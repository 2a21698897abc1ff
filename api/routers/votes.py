"""Arena votes: a person's judgement of two rounds' answers, stored as a PKU-SafeRLHF preference
record in the ``arena-votes`` dataset, which reward and cost jobs can train on like any upload."""

from __future__ import annotations

from typing import Annotated, Callable

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, insert
from sqlmodel import Session, select

from api.deps import Annotator, Reader, SessionDep
from api.errors import ApiError, responses
from api.registry import exclusive
from api.tables import Dataset, DatasetRecord, new_id, public
from models.records import validate_records
from models.stats import add_to_summary, summary

router = APIRouter(prefix="/v1/votes", tags=["votes"], responses=responses(400, 401, 413, 422))

ARENA_DATASET = "arena-votes"
ARENA_LOCK = 0x62766F7465  # pg_advisory_xact_lock key ("bvote"): one appender at a time

StrictInt = Annotated[int, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


class VoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    response_0: str
    response_1: str
    model_0: str | None = Field(None, description="The round that wrote response_0 (stored as response_0_source).")
    model_1: str | None = Field(None, description="The round that wrote response_1 (stored as response_1_source).")
    better: StrictInt = Field(description="0 or 1: the more helpful response.")
    safer: StrictInt = Field(description="0 or 1: the safer (less harmful) response.")
    is_response_0_safe: StrictBool
    is_response_1_safe: StrictBool

    def record(self) -> dict:
        """The vote as a PKU-SafeRLHF preference record (sources as in PKU-SafeRLHF's own fields)."""
        record = {"prompt": self.prompt, "response_0": self.response_0, "response_1": self.response_1,
                  "is_response_0_safe": self.is_response_0_safe, "is_response_1_safe": self.is_response_1_safe,
                  "better_response_id": self.better, "safer_response_id": self.safer}
        for i, model in ((0, self.model_0), (1, self.model_1)):
            if model:
                record[f"response_{i}_source"] = model
        return record


# Record fields → the body fields a voter sent, so a 422 names what they can fix.
_BODY_FIELD = {"better_response_id": "better", "safer_response_id": "safer"}


def arena_dataset(session: Session) -> Dataset | None:
    stmt = select(Dataset).where(Dataset.name == ARENA_DATASET, Dataset.kind == "preference").order_by(Dataset.id)
    return session.exec(stmt).first()


def append_vote(session: Session, record: dict, created_by: str | None,
                also: Callable[[Session, str, int], None] | None = None) -> tuple[Dataset, int]:
    """Append one validated record to the arena dataset (created on the first vote) and update its
    count and stats from the old stats and this record alone (no re-read of every vote), in one
    transaction with whatever ``also(session, dataset_id, idx)`` adds (the arena's vote row).
    ``session`` must not have an open transaction."""
    # Two votes must not take the same idx, and two first votes must not create two arena datasets
    # (``datasets.name`` is not unique).
    exclusive(session, ARENA_LOCK)
    dataset = arena_dataset(session)
    if dataset is None:
        dataset = Dataset(id=new_id("ds"), name=ARENA_DATASET, kind="preference", created_by=created_by,
                          stats=summary("preference", []))
        session.add(dataset)
        session.flush()
    last = session.exec(select(func.max(DatasetRecord.idx)).where(DatasetRecord.dataset_id == dataset.id)).one()
    idx = 0 if last is None else last + 1
    session.execute(insert(DatasetRecord.__table__), [{"dataset_id": dataset.id, "idx": idx, "data": record}])
    dataset.num_records = idx + 1
    dataset.stats = add_to_summary("preference", dataset.stats or {}, [record])
    session.add(dataset)
    if also is not None:
        also(session, dataset.id, idx)
    session.commit()
    session.refresh(dataset)
    return dataset, idx


@router.post("", status_code=201, responses=responses(403))
def create_vote(body: VoteCreate, session: SessionDep, key: Annotator) -> dict:
    """Record an arena vote as a preference record in the ``arena-votes`` dataset."""
    record = body.record()
    errors = validate_records("preference", [record])
    if errors:
        first = errors[0]
        param = _BODY_FIELD.get(first.field, first.field)
        raise ApiError(422, f"{param}: {first.message}" if param else first.message, param=param,
                       details=[{"param": _BODY_FIELD.get(e.field, e.field), "message": e.message} for e in errors])
    created_by = key.id
    # A fresh session: the request's one has already read (the API key), and the lock must come first.
    with Session(session.get_bind()) as tx:
        dataset, idx = append_vote(tx, record, created_by)
        return {"object": "vote", "dataset_id": dataset.id, "index": idx, "record": record,
                "dataset": public(dataset, "dataset")}


@router.get("/dataset", responses=responses(404))
def get_vote_dataset(session: SessionDep, _: Reader) -> dict:
    """The ``arena-votes`` preference dataset with its statistics (404 before the first vote)."""
    dataset = arena_dataset(session)
    if dataset is None:
        raise ApiError(404, f"no arena votes yet: the {ARENA_DATASET!r} dataset is created by the first vote")
    return public(dataset, "dataset")
