"""Queries shared by the API and the workers: dataset records, the model registry, job events."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import insert
from sqlmodel import Session, select

from api.errors import ApiError
from api.tables import Dataset, DatasetRecord, JobEvent, Model, Round, new_id


def load_records(session: Session, dataset_id: str) -> list[dict]:
    """All records of a dataset, in upload order."""
    stmt = select(DatasetRecord.data).where(DatasetRecord.dataset_id == dataset_id).order_by(DatasetRecord.idx)
    return list(session.exec(stmt))


def find_model(session: Session, ref: str) -> Model | None:
    """A registered model by id, or by name (the newest of that name)."""
    model = session.get(Model, ref)
    if model is None:
        model = session.exec(select(Model).where(Model.name == ref).order_by(Model.id.desc())).first()
    return model


def find_round(session: Session, ref: str) -> Round | None:
    return session.exec(select(Round).where((Round.name == ref) | (Round.id == ref))).first()


def resolve_model_path(session: Session, ref: str) -> str:
    """A model id, model name or round name (→ its policy) to a local directory; an existing
    local directory passes through. Unknown refs raise ``ApiError(404)`` naming the ref."""
    model = find_model(session, ref)
    if model is None:
        round_ = find_round(session, ref)
        if round_ is not None:
            model = session.get(Model, round_.policy_model_id)
    if model is not None:
        return model.path
    if Path(ref).is_dir():
        return str(Path(ref).resolve())
    raise ApiError(404, f"model {ref!r} not found: not a registered model id, model name, round name or local directory",
                   param="model")


def register_model(session: Session, name: str, kind: str, path: str, job_id: str | None = None,
                   metrics: dict | None = None) -> Model:
    model = Model(id=new_id("model"), name=name, kind=kind, path=str(path), job_id=job_id, metrics=metrics or {})
    session.add(model)
    session.commit()
    session.refresh(model)
    return model


def add_event(session: Session, job_id: str, message: str = "", data: dict | None = None, level: str = "info") -> None:
    session.add(JobEvent(job_id=job_id, message=message, data=data or {}, level=level, created_at=time.time()))
    session.commit()



INSERT_CHUNK = 5000


def create_dataset_rows(session: Session, name: str, kind: str, records: list[dict],
                        created_by: str | None = None) -> Dataset:
    """Store already-validated records as a dataset, in one transaction: the dataset row and all
    its records land together or not at all. Bulk inserts keep 100k records to seconds."""
    from models.stats import summary

    dataset = Dataset(id=new_id("ds"), name=name, kind=kind, num_records=len(records), stats=summary(kind, records),
                      created_by=created_by)
    session.add(dataset)
    session.flush()
    table = DatasetRecord.__table__
    for start in range(0, len(records), INSERT_CHUNK):
        rows = [{"dataset_id": dataset.id, "idx": start + i, "data": r}
                for i, r in enumerate(records[start:start + INSERT_CHUNK])]
        session.execute(insert(table), rows)
    session.commit()
    session.refresh(dataset)
    return dataset
