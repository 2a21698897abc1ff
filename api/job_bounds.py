"""A job's size, checked at ``POST /v1/jobs`` and described in ``/openapi.json`` (issue 18: "every size a job
accepts has a declared bound").

The bounds are declared once, next to each config field (``models.jobs.Bound``); here they meet what only
the API knows: the admin's caps (``BEAVER_MAX_JOB_*``), each named model's context window and each
dataset's record count (``models.jobs.check_size``). ``job_create_schema`` gives the request body's
schema: one object per job type with its params' bounds, the caps as they are when the schema is built.
"""

from __future__ import annotations

from sqlmodel import Session, select

from api.registry import ModelRef
from api.settings import get_settings
from api.tables import Dataset
from models.jobs import JOB_TYPES, ParamsError, check_size, params_schema
from models.loading import model_context


def check_job_size(session: Session, job_type: str, config, dataset_ids: list[str],
                   models: dict[str, ModelRef]) -> None:
    """Raises ``ParamsError`` when the job asks for more than its models' context or the caps allow.
    ``models``: param → what ``check_model`` found (a hub model not in the cache has no path: the tokens
    cap alone bounds it)."""
    counts = dict(session.exec(select(Dataset.id, Dataset.num_records).where(Dataset.id.in_(set(dataset_ids)))).all())
    records = sum(counts.get(i, 0) for i in dataset_ids)  # a dataset listed twice is read twice
    contexts = {param: model_context(found.path) if found.path else None for param, found in models.items()}
    check_size(job_type, config, records, contexts, get_settings().job_caps)
    check_harm_categories(session, config, dataset_ids)


def check_harm_categories(session: Session, config, dataset_ids: list[str]) -> None:
    """A cost job's ``harm_categories`` are flagged in its datasets (their upload ``stats`` count each
    category): a misspelt name is a 422 now rather than a failed job (the worker checks again)."""
    wanted = getattr(config, "harm_categories", None)
    if not wanted:
        return
    stats = session.exec(select(Dataset.stats).where(Dataset.id.in_(set(dataset_ids)))).all()
    known = {c for s in stats for c in (s or {}).get("harm_categories", {})}
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise ParamsError(f"params.harm_categories: {', '.join(map(repr, unknown))} flagged on no response of the "
                          f"job's datasets, which flag {', '.join(sorted(known)) or 'no category at all'}",
                          "params.harm_categories")


def job_create_schema(schema: dict) -> None:
    """``JobCreate``'s JSON Schema (pydantic's ``json_schema_extra``): one object per job type, its
    ``type`` a constant, its ``params`` that type's config with every bound, ``world_size`` 1 for the job
    types that run on one rank."""
    caps = get_settings().job_caps
    common = schema.get("properties", {})
    variants = []
    for name, spec in JOB_TYPES.items():
        world_size = {**common.get("world_size", {}), **({} if spec.multi_rank else {"maximum": 1})}
        params = params_schema(name, caps)
        variants.append({"type": "object", "title": f"JobCreate[{name}]", "additionalProperties": False,
                         "required": ["type", "params"] if params.get("required") else ["type"],
                         "properties": {"type": {"const": name, "description": spec.summary},
                                        "params": params,
                                        "datasets": common.get("datasets", {"type": "array"}),
                                        "world_size": world_size}})
    description = schema.get("description")
    schema.clear()
    schema.update({"title": "JobCreate", "oneOf": variants, **({"description": description} if description else {})})
