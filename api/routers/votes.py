"""Arena votes: a person's judgement of two rounds' answers, stored as a PKU-SafeRLHF preference
record in the ``arena-votes`` dataset, which reward and cost jobs can train on like any upload.

Votes are made on an arena battle's turn (``POST /v1/arena/battles/{id}/votes``), on answers the
server sent. The older ``POST /v1/votes`` took the prompt and both answers from the client and put
them in this dataset as if rounds had written them; it is retired (issue 18): preference records of
your own go to ``POST /v1/datasets``."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter
from sqlalchemy import func, insert
from sqlmodel import Session, select

from api.deps import Reader, SessionDep
from api.errors import ApiError, responses
from api.registry import exclusive
from api.tables import Dataset, DatasetRecord, new_id, public
from models.stats import add_to_summary, summary

router = APIRouter(prefix="/v1/votes", tags=["votes"], responses=responses(400, 401, 413, 422))

ARENA_DATASET = "arena-votes"
ARENA_LOCK = 0x62766F7465  # pg_advisory_xact_lock key ("bvote"): one appender at a time


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


@router.get("/dataset", responses=responses(404))
def get_vote_dataset(session: SessionDep, _: Reader) -> dict:
    """The ``arena-votes`` preference dataset with its statistics (404 before the first vote)."""
    dataset = arena_dataset(session)
    if dataset is None:
        raise ApiError(404, f"no arena votes yet: the {ARENA_DATASET!r} dataset is created by the first vote")
    return public(dataset, "dataset")
