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
    # On several ranks it is a collective (every rank gets the same answer at the same step).
    should_stop: Callable[[], bool] = lambda: False
    # the same request read locally: cheap enough for every token and free of collectives, for the
    # loops inside a step (sampling, scoring batches). On several ranks each rank may see it at a
    # different point; the worker kills ranks that do not stop together. Default: should_stop.
    stop_requested: Callable[[], bool] | None = None
    # where the job starts from on a re-run (a checkpoint directory), if any.
    resume_from: str | None = None

    def __post_init__(self):
        if self.stop_requested is None:
            self.stop_requested = self.should_stop

    def check_cancel(self) -> None:
        if self.should_stop():
            raise JobCancelled("cancelled")


@dataclass(frozen=True)
class JobType:
    config: str  # "module:ConfigClass"
    entry: str  # "module:function"
    queue: str  # Celery queue: "gpu" for training, "cpu" for light work
    # param name -> the kind of model it names: "causal" (a policy), "score" (a reward or cost
    # model) or "any" (a backbone: either); checked when the job is created.
    models: tuple[tuple[str, str], ...] = ()
    # dataset kinds the job reads (empty: any); at least one dataset is required when set.
    dataset_kinds: tuple[str, ...] = ()
    # params the job type sets itself (not accepted from users).
    fixed: tuple[tuple[str, object], ...] = ()
    summary: str = ""  # one line for the params reference
    multi_rank: bool = False  # runs on world_size > 1 ranks (the training jobs; models/distributed.py)
    # reward_model / cost_model default to the newest round's (filled in by the API at POST /v1/jobs).
    default_judges: bool = False

    def config_class(self) -> type:
        return _load(self.config)

    def entry_point(self) -> Callable[[Any, JobContext], JobResult]:
        return _load(self.entry)


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


_PPO_MODELS = (("model", "causal"), ("reward_model", "score"), ("cost_model", "score"), ("reward_critic", "any"),
               ("cost_critic", "any"))
_PPO_DATA = ("prompt", "preference", "sft")  # prompts from prompt/preference records; sft records feed PTX

# Job type -> where it lives. Strings, so importing this module stays cheap.
JOB_TYPES: dict[str, JobType] = {
    "dataset_stats": JobType("models.stats:StatsConfig", "models.stats:run", "cpu",
                             summary="statistics of each dataset (lengths, safety ratios, harm categories)."),
    "generate": JobType("models.sampling:GenerateConfig", "models.sampling:run", "gpu", (("model", "causal"),),
                        ("prompt", "preference", "sft", "samples"),
                        summary="a policy's sampled answers to every prompt, as a new `samples` dataset."),
    "reward": JobType("models.score_training:ScoreTrainingConfig", "models.score_training:run_reward", "gpu",
                      (("model", "any"),), ("preference",),
                      multi_rank=True,
                      summary="a reward model on the helpfulness preference (`better_response_id`)."),
    "cost": JobType("models.score_training:ScoreTrainingConfig", "models.score_training:run_cost", "gpu",
                    (("model", "any"),), ("preference",),
                    multi_rank=True,
                    summary="a cost model on the harmlessness preference and the safety labels (cost > 0 ⇔ unsafe)."),
    "sft": JobType("models.sft:SFTConfig", "models.sft:run", "gpu", (("model", "causal"),), ("sft",),
                   multi_rank=True, summary="supervised fine-tuning on every assistant turn of sft conversations."),
    "dpo": JobType("models.dpo:DPOConfig", "models.dpo:run", "gpu", (("model", "causal"), ("reference", "causal")),
                   ("preference",), multi_rank=True,
                   summary="DPO on the helpfulness preference (the paper's reward-free baseline)."),
    "evaluate": JobType("models.evaluate:EvaluateConfig", "models.evaluate:run", "gpu",
                        (("models", "causal"), ("reward_model", "score"), ("cost_model", "score")), ("prompt",),
                        default_judges=True,
                        summary="rounds' answers to your prompts, scored by one reference reward/cost pair: harmful "
                                "ratio, reward, cost, refusals, win rates and the 2 × 2 table, with 95 % intervals."),
    "ppo_lag": JobType("models.ppo_lag:PPOLagConfig", "models.ppo_lag:run_ppo_lag", "gpu", _PPO_MODELS, _PPO_DATA,
                       (("objective", "lagrangian"),),
                       multi_rank=True,
                       summary="a Safe RLHF round: PPO-Lagrangian, reward maximised while J̄_C ≤ `threshold`, λ learned."),
    "ppo": JobType("models.ppo_lag:PPOLagConfig", "models.ppo_lag:run_ppo", "gpu", _PPO_MODELS, _PPO_DATA,
                   (("objective", "reward"),), multi_rank=True,
                   summary="baseline: PPO on the reward alone (the cost is scored for telemetry)."),
    "ppo_shaping": JobType("models.ppo_lag:PPOLagConfig", "models.ppo_lag:run_ppo_shaping", "gpu", _PPO_MODELS,
                           _PPO_DATA, (("objective", "shaping"),),
                           multi_rank=True, summary="baseline: PPO on a fixed `R − shaping_lambda·C`."),
}


def register(name: str, job_type: JobType) -> None:
    JOB_TYPES[name] = job_type


def parse_params(job_type: str, params: dict | None) -> Any:
    """Build the config dataclass of ``job_type`` from ``params``; unknown or mistyped fields
    raise ``ParamsError`` naming the field."""
    if job_type not in JOB_TYPES:
        raise ParamsError(f"unknown job type {job_type!r}; known: {', '.join(sorted(JOB_TYPES))}", "type")
    spec = JOB_TYPES[job_type]
    params = dict(params or {})
    for name, value in spec.fixed:
        if name in params and params[name] != value:
            raise ParamsError(f"params.{name} is set by the job type {job_type!r}", f"params.{name}")
        params[name] = value
    return build_config(spec.config_class(), params)


def model_refs(job_type: str, config: Any) -> list[tuple[str, str, str]]:
    """(param, reference, expected kind) of every model a job's config names."""
    refs = []
    for name, kind in JOB_TYPES[job_type].models:
        value = getattr(config, name, None)
        if isinstance(value, list):  # e.g. evaluate's models
            refs += [(f"{name}[{i}]", ref, kind) for i, ref in enumerate(value)]
        elif value:
            refs.append((name, value, kind))
    return refs


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
        default = fields[name].default_factory
        if isinstance(value, dict) and default is not dataclasses.MISSING and dataclasses.is_dataclass(default()):
            # A partial object overrides some fields of this config's own default (e.g. one
            # optimizer's lr), keeping the rest of that default rather than the class's.
            value = {**dataclasses.asdict(default()), **value}
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


# --- the params reference (README and ``beaver jobs``) --------------------------------------------------
# Generated from the config dataclasses and the doc string under each field, so the documentation
# and the code cannot drift: a test checks the README holds exactly ``params_markdown()``.


def field_docs(cls: type) -> dict[str, str]:
    """The doc string under each field of a dataclass and its dataclass bases."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) \
                    and isinstance(getattr(after, "value", None), ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split()).replace("``", "`")
    return docs


def _type_name(hint) -> str:
    if dataclasses.is_dataclass(hint):
        return "object"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0]) if args else 'any'}"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(hint, getattr(hint, "__name__", "any"))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _json(value) -> str:
    import json

    if dataclasses.is_dataclass(value):
        return f"`{json.dumps(dataclasses.asdict(value))}`"
    return f"`{json.dumps(value)}`" if value not in ("", None) or value is None else '`""`'


def _table(cls: type, names: list[str]) -> list[str]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rows = ["| param | type | default | meaning |", "|---|---|---|---|"]
    for name in names:
        nested = [a for a in (hints[name], *typing.get_args(hints[name])) if dataclasses.is_dataclass(a)]
        doc = docs.get(name, "")
        if nested and not doc:
            doc = f"see `{nested[0].__name__}` below"
        rows.append(f"| `{name}` | {_type_name(hints[name])} | {_json(_default(fields[name]))} | {doc} |")
    return rows


def params_markdown() -> str:
    """Every job type's params as Markdown tables: the shared training params once, then each job's own,
    then the nested objects (``optim``, ``lora``, ``sampling``)."""
    from models.evaluate import JudgeConfig
    from models.generation import SamplingConfig
    from models.training import LoraConfig, OptimConfig, TrainingConfig

    shared = [f.name for f in dataclasses.fields(TrainingConfig)]
    lines = ["**Every training job** (sft, dpo, reward, cost, ppo_lag, ppo, ppo_shaping) takes:", ""]
    lines += _table(TrainingConfig, shared)
    shown: dict[type, str] = {}
    for name, spec in JOB_TYPES.items():
        cls = spec.config_class()
        training = issubclass(cls, TrainingConfig)
        if cls in shown:  # cost shares reward's config, ppo and ppo_shaping ppo_lag's
            lines += ["", f"**`{name}`** — {spec.summary} The same params as `{shown[cls]}`."]
            continue
        lines += ["", f"**`{name}`** — {spec.summary}" + (" Also the training params above." if training else "")]
        shown[cls] = name
        fixed = {k for k, _ in spec.fixed}
        own = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed
               and not (training and f.name in shared)]
        lines += [""] + _table(cls, own)
    for title, cls in (("`optim` / `actor_optim` / `critic_optim` (OptimConfig)", OptimConfig),
                       ("`lora` (LoraConfig)", LoraConfig), ("`sampling` (SamplingConfig)", SamplingConfig),
                       ("`judge` (evaluate's JudgeConfig)", JudgeConfig)):
        lines += ["", f"**{title}** — {(cls.__doc__ or '').strip().splitlines()[0].replace('``', '`')}", ""]
        lines += _table(cls, [f.name for f in dataclasses.fields(cls)])
    return "\n".join(lines) + "\n"
