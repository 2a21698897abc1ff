"""The model registry: base models people register, and models jobs produce. ``GET /v1/models``
is also the OpenAI-compatible list that chat clients read (rounds first, then models)."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from api.deps import STAFF_ROLES, Reader, SessionDep, Trainer
from api.errors import ApiError, not_found, responses
from api.registry import (OutsideModelRoots, chat_template_record, find_model, is_model_dir, local_model_dir,
                          register_model)
from api.tables import Model, Round

router = APIRouter(prefix="/v1/models", tags=["models"], responses=responses(400, 401, 413, 422))


class ModelCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="A name people will recognise, e.g. 'llama-tiny-base'.")
    kind: Literal["policy", "reward", "cost"] = Field(description="policy (a causal LM) or a score model.")
    path: str = Field(min_length=1, max_length=4096, description="A directory in Hugging Face format, readable by the "
                      "workers: an absolute path under a model root (BEAVER_MODEL_ROOTS).")
    metrics: dict = Field(default_factory=dict)

    model_config = {"extra": "forbid"}


def model_public(m: Model, staff: bool = True) -> dict:
    """OpenAI's model object (id, object, created, owned_by) with Beaver's registry fields; the
    server ``path`` only for admins and trainers."""
    data = {"id": m.id, "object": "model", "created": m.created_at, "owned_by": "beaver", "name": m.name,
            "kind": m.kind, "path": m.path, "job_id": m.job_id, "metrics": m.metrics}
    if not staff:
        del data["path"]
    return data


def round_as_model(session: Session, r: Round) -> dict:
    return {"id": r.name, "object": "model", "created": r.created_at, "owned_by": "beaver", "name": r.name,
            "kind": "round", "round_id": r.id, "policy_model_id": r.policy_model_id,
            "reward_model_id": r.reward_model_id, "cost_model_id": r.cost_model_id, "metrics": r.metrics,
            "chat_template": chat_template_record(session.get(Model, r.policy_model_id))}


@router.post("", status_code=201, responses=responses(403))
def create_model(body: ModelCreate, session: SessionDep, _: Trainer) -> dict:
    """Register a model directory (for example a base model to train from); it must lie under a
    model root, after symlinks are resolved, and be what ``kind`` says: a policy a causal LM, a
    reward or cost model a ``*ForSequenceClassification`` with one label whose score head is in its
    checkpoint; and its tokenizer must give a chat format Beaver can use."""
    try:
        path = local_model_dir(body.path)
    except OutsideModelRoots as e:
        raise ApiError(422, str(e), param="path") from None
    if not is_model_dir(path):
        raise ApiError(422, f"{body.path!r} is not a Hugging Face model directory (no config.json)", param="path")
    check_model_dir(path, body.kind)
    return model_public(register_model(session, body.name, body.kind, str(path), metrics=body.metrics))


def check_model_dir(path: Path, kind: str) -> None:
    """422 naming ``kind`` or ``path`` when the folder is not a ``kind`` model Beaver can serve and
    train: what it is (``models.loading.kind_problem``), or why its chat format cannot be used."""
    from models.chat_format import ChatFormat
    from models.loading import kind_problem

    try:
        problem = kind_problem(path, kind)
    except (OSError, ValueError) as e:  # an unreadable config.json or checkpoint
        problem = "path", f"{path}: {str(e).splitlines()[0][:300]}"
    if problem is not None:
        raise ApiError(422, problem[1], param=problem[0])
    try:
        ChatFormat.load(path)
    except Exception as e:  # noqa: BLE001 — a missing tokenizer, a template Beaver cannot line up
        raise ApiError(422, f"{path}: Beaver cannot read conversations with its tokenizer: "
                       f"{str(e).splitlines()[0][:500]}. Give the folder a tokenizer whose chat template writes an "
                       f"assistant turn after the conversation it prompts with and closes it with an end-of-sequence "
                       f"or special token (or none: Beaver then writes the Safe RLHF template)", param="path") from None


@router.get("")
def list_models(session: SessionDep, key: Reader, kind: str | None = None) -> dict:
    """Rounds and registered models, in OpenAI's list shape."""
    rounds = list(session.exec(select(Round).order_by(Round.id))) if kind in (None, "round") else []
    data = [round_as_model(session, r) for r in rounds]
    if kind != "round":
        stmt = select(Model).order_by(Model.id)
        if kind:
            stmt = stmt.where(Model.kind == kind)
        data += [model_public(m, key.role in STAFF_ROLES) for m in session.exec(stmt)]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/{model_ref}", responses=responses(404))
def get_model(model_ref: str, session: SessionDep, key: Reader) -> dict:
    """One model by id or name, or a round by name."""
    model = find_model(session, model_ref)
    if model is not None:
        return model_public(model, key.role in STAFF_ROLES)
    round_ = session.exec(select(Round).where(Round.name == model_ref)).first()
    if round_ is not None:
        return round_as_model(session, round_)
    raise not_found("model", model_ref)


def tar_chunks(folder: Path, chunk: int = 1 << 20):
    """A plain (uncompressed: weights don't compress) tar of ``folder``, streamed file by file, so a
    16 GB model never sits in memory; members are ``<folder name>/<relative path>``."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        stat = path.stat()
        info = tarfile.TarInfo(f"{folder.name}/{path.relative_to(folder).as_posix()}")
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with open(path, "rb") as f:
            while block := f.read(chunk):
                yield block
        if info.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # the end-of-archive marker


@router.get("/{model_ref}/archive", response_model=None, response_class=StreamingResponse,
            responses=responses(403, 404))
def download_model(model_ref: str, session: SessionDep, _: Trainer):
    """A registered model (or a round's policy) as a tar of its Hugging Face folder — weights, config,
    tokenizer, chat template — which ``from_pretrained`` and vLLM load once unpacked."""
    model = find_model(session, model_ref)
    if model is None and (round_ := session.exec(select(Round).where(Round.name == model_ref)).first()) is not None:
        model = session.get(Model, round_.policy_model_id)
    if model is None:
        raise not_found("model", model_ref)
    folder = Path(model.path)
    if not folder.is_dir():
        raise ApiError(404, f"the files of model {model.name!r} are gone from the server", param="model_ref")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", model.name) or model.id
    return StreamingResponse(tar_chunks(folder), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})
