"""Queries shared by the API and the workers: dataset records, the model registry and what a model
reference names, job events. Errors here are domain errors (``ModelNotFound``, ``WrongModelKind``);
the routers turn them into HTTP statuses."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError)
from huggingface_hub.utils import validate_repo_id
from sqlalchemy import insert, text
from sqlmodel import Session, select

from api.settings import get_settings
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


def newest_judged_round(session: Session) -> Round | None:
    """The newest round that has both a reward and a cost model: the reference judges by default
    (the arena's scores, an evaluate job's), the same pair for every round they judge."""
    return session.exec(select(Round).where(Round.reward_model_id.is_not(None), Round.cost_model_id.is_not(None))
                        .order_by(Round.created_at.desc(), Round.id.desc())).first()


def reference_round(session: Session) -> Round | None:
    """The round whose reward and cost models are the reference judges of everything compared across
    rounds — the arena's scores, ``/v1/chat/compare``, ``/v1/moderations`` without a model, an
    evaluate job's defaults: ``BEAVER_ARENA_JUDGES`` when set, else the newest round that has both."""
    name = get_settings().arena_judges
    return find_round(session, name) if name else newest_judged_round(session)


# --- model references --------------------------------------------------------------------------------
# What a job's model param may name, checked at POST /v1/jobs (``check_model``) and loaded by the
# worker (``resolve_model_path``) through the same ``locate_model``, so a reference the API accepts
# is one the worker finds.

class ModelNotFound(LookupError):
    """A model reference that names nothing Beaver can load (the message names the ref)."""


class WrongModelKind(ValueError):
    """A model reference that names a model of another kind than its param needs."""


class OutsideModelRoots(ModelNotFound):
    """A local path that is relative or resolves outside every model root (``BEAVER_MODEL_ROOTS``)."""


def is_path(ref: str) -> bool:
    """Whether a model reference is meant as a local folder (``org/name`` is a hub id, never a relative path)."""
    return ref.startswith(("/", "~", "./", "../")) or ref in (".", "..")


def local_model_dir(ref: str) -> Path:
    """``ref`` as an absolute path inside a model root, resolved after symlinks (so neither a symlink
    nor ``..`` leads out). Raises ``OutsideModelRoots`` with one message whether or not the path
    exists, so the answer tells nothing about the server's disk outside the roots."""
    roots = get_settings().resolved_model_roots
    where = f"the model roots are {':'.join(str(r) for r in roots)} (BEAVER_MODEL_ROOTS)"
    try:
        path = Path(ref).expanduser()
    except RuntimeError:  # ~user of no such user
        path = Path(ref)
    if not path.is_absolute():
        raise OutsideModelRoots(f"{ref!r} is not an absolute path; give a folder under a model root: {where}")
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        resolved = None
    if resolved is None or not any(resolved.is_relative_to(root) for root in roots):
        raise OutsideModelRoots(f"{ref!r} is not under a model root: {where}")
    return resolved


def is_model_dir(path: Path) -> bool:
    """A folder with a config.json (False, not an error, for a name the file system refuses)."""
    try:
        return (path / "config.json").is_file()
    except OSError:
        return False


@dataclass(frozen=True)
class ModelRef:
    source: str  # "model" (registered) | "round" (its policy) | "local" (a directory) | "hub" (a hub id)
    path: str | None  # a local Hugging Face directory; None for a hub model not in the cache
    kind: str | None = None  # a registered model's kind: policy | reward | cost
    architectures: tuple[str, ...] | None = None  # config.json's ``architectures``, where it was read


# Weight formats transformers' PyTorch loaders never read (Llama's original/*.pth alone is a second copy).
HUB_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "onnx/*", "*.gguf", "*.tflite", "original/*", "*.pth"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    return hf_constants.HF_HUB_OFFLINE if value is None else value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir() -> str:
    """The Hugging Face hub cache as set now: HF_HUB_CACHE, else $HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return hf_constants.HF_HUB_CACHE


def locate_model(session: Session, ref: str, download: bool = False) -> ModelRef:
    """What ``ref`` names, first match wins: a registered model id or name, a round name or id (its
    policy), a local directory with a ``config.json`` (an absolute path under a model root,
    ``local_model_dir``), a Hugging Face hub id (``org/name`` or ``name``) in the local cache or —
    unless HF_HUB_OFFLINE — on the hub. ``download`` fetches a hub
    model into the cache (the worker); without it nothing is downloaded (the API's check).
    Raises ``ModelNotFound`` saying what ``ref`` is not."""
    model, source = find_model(session, ref), "model"
    if model is None and (round_ := find_round(session, ref)) is not None:
        model, source = session.get(Model, round_.policy_model_id), "round"
    if model is not None:
        if not Path(model.path).is_dir():
            raise ModelNotFound(f"{'round' if source == 'round' else 'registered model'} {ref!r} points to "
                                f"{model.path}, which is no longer a directory")
        return ModelRef(source, model.path, kind=model.kind)
    if is_path(ref):  # a local folder: only under the model roots
        path = local_model_dir(ref)
        if is_model_dir(path):
            return ModelRef("local", str(path), architectures=_architectures(path / "config.json"))
        try:
            folder = path.is_dir()
        except OSError:
            folder = False
        if folder:
            raise ModelNotFound(f"{ref!r} is a directory but not a Hugging Face model: it has no config.json")
        raise ModelNotFound(f"model {ref!r} not found: not a registered model id or name, a round name, a local "
                            f"directory or a Hugging Face hub id")
    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise ModelNotFound(f"model {ref!r} not found: not a registered model id or name, a round name, a local "
                            f"directory or a Hugging Face hub id") from None
    if download:
        return ModelRef("hub", _snapshot(ref))
    cached = try_to_load_from_cache(ref, "config.json", cache_dir=hub_cache_dir())
    if isinstance(cached, str):
        return ModelRef("hub", str(Path(cached).parent), architectures=_architectures(Path(cached)))
    if hub_offline():
        raise ModelNotFound(f"model {ref!r} not found: not a registered model id or name, a round name, a local "
                            f"directory, or a Hugging Face model in the local cache ({hub_cache_dir()}); "
                            f"HF_HUB_OFFLINE is set, so the hub was not asked")
    try:
        info = HfApi(endpoint=os.environ.get("HF_ENDPOINT")).model_info(ref, timeout=10)
    except RepositoryNotFoundError:
        raise ModelNotFound(f"model {ref!r} not found: not a registered model, a round or a local directory, and "
                            f"no such model on the Hugging Face hub") from None
    except Exception as e:  # noqa: BLE001 — the network errors of huggingface_hub's HTTP client of the day
        raise ModelNotFound(_unreachable(ref, e)) from None
    architectures = (info.config or {}).get("architectures") if isinstance(info.config, dict) else None
    return ModelRef("hub", None, architectures=tuple(architectures) if architectures is not None else None)


def resolve_model_path(session: Session, ref: str) -> str:
    """A model reference (see ``locate_model``) as a local Hugging Face directory, downloading a hub
    model into the cache unless HF_HUB_OFFLINE (then it must be cached). Raises ``ModelNotFound``."""
    return locate_model(session, ref, download=True).path


# params that name one kind of score model (cost_models: every entry's ``model``, ``cost_models[i].model``)
SCORE_KINDS = {"reward_model": "reward", "cost_model": "cost", "cost_models": "cost"}


def score_kind(param: str) -> str | None:
    """The kind of score model ``param`` must name (reward, cost), or None when either will do."""
    return SCORE_KINDS.get(param.split("[", 1)[0])


def check_model(session: Session, param: str, ref: str, expected: str) -> ModelRef:
    """``locate_model`` and the kind check of POST /v1/jobs. ``expected``: "causal" (a policy),
    "score" (a reward or cost model; ``reward_model`` must be a reward one, ``cost_model`` a cost one)
    or "any" (a backbone). A registered model is judged by its kind, a directory by its config.json's
    architectures. Raises ``ModelNotFound`` or ``WrongModelKind``."""
    found = locate_model(session, ref)
    if expected == "any":
        return found
    if found.kind is not None:
        wanted = ["policy"] if expected == "causal" else [score_kind(param)] if score_kind(param) \
            else ["reward", "cost"]
        if found.kind not in wanted:
            what = "a round, which stands for its policy here" if found.source == "round" else \
                f"a registered {found.kind} model"
            raise WrongModelKind(f"{ref!r} is {what}, not a {' or '.join(wanted)} model")
    elif found.architectures is not None:
        score = [a for a in found.architectures if a.endswith("ForSequenceClassification")]
        if expected == "causal" and score:
            raise WrongModelKind(f"{ref!r} is a score model ({score[0]}), not a causal language model")
        if expected == "score" and not score:
            what = f"a {', '.join(found.architectures)}" if found.architectures else \
                "a model without architectures in its config.json"
            raise WrongModelKind(f"{ref!r} is {what}, not a score model (*ForSequenceClassification)")
        if expected == "score" and found.path is not None:  # one label, and its head in the checkpoint
            from models.loading import kind_problem

            try:
                problem = kind_problem(found.path, score_kind(param) or "reward")
            except (OSError, ValueError) as e:  # an unreadable config.json or checkpoint
                problem = "path", f"{ref!r}: {str(e).splitlines()[0][:300]}"
            if problem is not None:
                raise WrongModelKind(problem[1])
    return found


def _architectures(config_file: Path) -> tuple[str, ...]:
    try:
        return tuple(json.loads(config_file.read_text()).get("architectures") or ())
    except (OSError, ValueError, AttributeError):
        raise ModelNotFound(f"{config_file} is not a readable Hugging Face config") from None


def _unreachable(ref: str, e: Exception) -> str:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"model {ref!r} is not in the local Hugging Face cache ({hub_cache_dir()}) and the hub is not reachable "
            f"({reason}): download it into the cache first, or set HF_HUB_OFFLINE=1 on a deployment without "
            f"network so this check looks at the cache only")


def _snapshot(repo_id: str) -> str:
    """A hub model's snapshot directory in the cache, downloaded unless offline."""
    offline = hub_offline()
    try:
        return snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=offline,
                                 ignore_patterns=HUB_IGNORE)
    except GatedRepoError:
        raise ModelNotFound(f"model {repo_id!r} is gated on the Hugging Face hub: accept its terms there and give "
                            f"the workers a token (HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"model {repo_id!r} not found: no such model on the Hugging Face hub") from None
    except LocalEntryNotFoundError as e:
        if offline:
            raise ModelNotFound(f"model {repo_id!r} is not in the local Hugging Face cache ({hub_cache_dir()}) and "
                                f"HF_HUB_OFFLINE is set") from None
        raise ModelNotFound(_unreachable(repo_id, e)) from None
    except Exception as e:  # noqa: BLE001 — as in locate_model
        raise ModelNotFound(_unreachable(repo_id, e)) from None


def chat_template_record(policy: Model | None) -> dict | None:
    """The chat template a trained policy recorded, ``{"source", "sha256"}``; None for a model
    registered by hand (it carries whatever template its tokenizer has)."""
    metrics = policy.metrics if policy is not None else {}
    if not metrics.get("chat_template"):
        return None
    return {"source": metrics["chat_template"], "sha256": metrics.get("chat_template_sha256")}


def register_model(session: Session, name: str, kind: str, path: str, job_id: str | None = None,
                   metrics: dict | None = None, commit: bool = True) -> Model:
    """``commit=False`` leaves the row in the caller's transaction (a worker's fenced write)."""
    model = Model(id=new_id("model"), name=name, kind=kind, path=str(path), job_id=job_id, metrics=metrics or {})
    session.add(model)
    session.flush()
    if commit:
        session.commit()
    session.refresh(model)
    return model


def exclusive(session: Session, lock_key: int) -> None:
    """Serialize this transaction with every other one that takes ``lock_key``, until it ends (for a
    read-then-write that must not interleave). ``session`` must not have an open transaction."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
    elif conn.dialect.name == "sqlite":
        # Python's sqlite3 opens a deferred transaction at the first write; take the write lock now,
        # so what we read is still true when we write (other writers wait, busy timeout).
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def add_event(session: Session, job_id: str, message: str = "", data: dict | None = None, level: str = "info") -> None:
    session.add(JobEvent(job_id=job_id, message=message, data=data or {}, level=level, created_at=time.time()))
    session.commit()



INSERT_CHUNK = 5000


def create_dataset_rows(session: Session, name: str, kind: str, records: list[dict],
                        created_by: str | None = None, commit: bool = True) -> Dataset:
    """Store already-validated records as a dataset, in one transaction: the dataset row and all
    its records land together or not at all. Bulk inserts keep 100k records to seconds.
    ``commit=False`` leaves them in the caller's transaction."""
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
    if commit:
        session.commit()
    session.refresh(dataset)
    return dataset
