"""The job contract between the service and the ML core.

A job type maps to one ``models/`` entry point ``run(config, ctx) -> JobResult`` and a config
dataclass (the job's ``params``). The API validates ``params`` against the dataclass when a job
is created, so a typo fails the request, not the job; the worker builds a ``JobContext`` from
the job row and calls the entry point. Nothing here knows about HTTP, SQL or Celery.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class JobCancelled(Exception):
    """Raised by an entry point when ``ctx.should_stop()`` turned true; the job ends ``cancelled``."""


class ParamsError(ValueError):
    """A job's params do not fit its config dataclass; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Artifact:
    """Something a job produced that the registry should know about."""

    kind: str  # "policy" | "reward" | "cost" (registered as models) | "dataset" (JSONL, registered as a dataset)
    path: str  # directory or file inside ctx.output_dir
    name: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class JobResult:
    metrics: dict = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)


@dataclass
class JobContext:
    """What an entry point gets from whoever runs it (a Celery task, a test, a notebook)."""

    output_dir: Path
    # the job's dataset ids, in the order given at POST /v1/jobs.
    datasets: list[str] = field(default_factory=list)
    # dataset id -> its records (dicts in the dataset's kind's schema); loaded lazily by the caller.
    load_dataset: Callable[[str], list[dict]] = lambda dataset_id: []
    # model id or local path -> local directory in Hugging Face format.
    resolve_model: Callable[[str], str] = lambda ref: ref
    # one progress event: {"step": int, "total_steps": int, "message": str, **metrics}
    report: Callable[[dict], None] = lambda event: None
    # true once the job was cancelled; entry points check it between steps and raise JobCancelled.
    should_stop: Callable[[], bool] = lambda: False
    # where the job starts from on a re-run (a checkpoint directory), if any.
    resume_from: str | None = None

    def check_cancel(self) -> None:
        if self.should_stop():
            raise JobCancelled("cancelled")


@dataclass(frozen=True)
class JobType:
    config: str  # "module:ConfigClass"
    entry: str  # "module:function"
    queue: str  # Celery queue: "gpu" for training, "cpu" for light work

    def config_class(self) -> type:
        return _load(self.config)

    def entry_point(self) -> Callable[[Any, JobContext], JobResult]:
        return _load(self.entry)


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


# Job type -> where it lives. Strings, so importing this module stays cheap.
JOB_TYPES: dict[str, JobType] = {
    "dataset_stats": JobType("models.stats:StatsConfig", "models.stats:run", "cpu"),
    "generate": JobType("models.sampling:GenerateConfig", "models.sampling:run", "gpu"),
    "reward": JobType("models.score_training:ScoreTrainingConfig", "models.score_training:run_reward", "gpu"),
    "cost": JobType("models.score_training:ScoreTrainingConfig", "models.score_training:run_cost", "gpu"),
    "sft": JobType("models.sft:SFTConfig", "models.sft:run", "gpu"),
    "dpo": JobType("models.dpo:DPOConfig", "models.dpo:run", "gpu"),
    "ppo_lag": JobType("models.ppo_lag:PPOLagConfig", "models.ppo_lag:run_ppo_lag", "gpu"),
    "ppo": JobType("models.ppo_lag:PPOLagConfig", "models.ppo_lag:run_ppo", "gpu"),
    "ppo_shaping": JobType("models.ppo_lag:PPOLagConfig", "models.ppo_lag:run_ppo_shaping", "gpu"),
}


def register(name: str, job_type: JobType) -> None:
    JOB_TYPES[name] = job_type


def parse_params(job_type: str, params: dict | None) -> Any:
    """Build the config dataclass of ``job_type`` from ``params``; unknown or mistyped fields
    raise ``ParamsError`` naming the field."""
    if job_type not in JOB_TYPES:
        raise ParamsError(f"unknown job type {job_type!r}; known: {', '.join(sorted(JOB_TYPES))}", "type")
    cls = JOB_TYPES[job_type].config_class()
    return build_config(cls, params or {})


def build_config(cls: type, params: dict, prefix: str = "params") -> Any:
    """Recursively build a (possibly nested) config dataclass from a dict, checking types."""
    if not isinstance(params, dict):
        raise ParamsError(f"{prefix} must be an object", prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ParamsError(f"unknown field {prefix}.{unknown[0]}; allowed: {', '.join(sorted(fields))}",
                          f"{prefix}.{unknown[0]}")
    kwargs = {}
    for name, value in params.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}.{name}")
    try:
        config = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ParamsError(f"{prefix}: {e}", prefix) from e
    return config


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if errors else f"{where}: bad value", where)
    if origin is typing.Literal:
        if value not in args:
            raise ParamsError(f"{where} must be one of {list(args)}, got {value!r}", where)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where} must be a list", where)
        inner = args[0] if args else typing.Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where} must be an object", where)
        return value
    if hint is typing.Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where} must be a number, got {value!r}", where)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where} must be an integer, got {value!r}", where)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where} must be true or false, got {value!r}", where)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where} must be a string, got {value!r}", where)
        return value
    return value


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
