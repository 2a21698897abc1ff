"""The job contract between the service and the ML core.

A job type maps to one ``models/`` entry point ``run(config, ctx) -> JobResult`` and a config
dataclass (the job's ``params``). The API validates ``params`` against the dataclass when a job
is created, so a typo fails the request, not the job; the worker builds a ``JobContext`` from
the job row and calls the entry point. Nothing here knows about HTTP, SQL or Celery.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class JobCancelled(Exception):
    """Raised by an entry point when ``ctx.should_stop()`` turned true; the job ends ``cancelled``."""


class ParamsError(ValueError):
    """A job's params do not fit its config dataclass; ``param`` names the offending field. A config's
    ``__post_init__`` may raise it with ``param`` one of its own fields' names: ``build_config``
    makes that the full path (``params.judge.unsafe_pattern``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EndpointError(RuntimeError):
    """An outbound endpoint (an evaluation judge) did not answer as it should. The message says how,
    by class only (``connection refused``, ``timed out``, ``HTTP 503``, …): never the endpoint's URL,
    an exception's text or a response body, since job errors and events are read by every role."""


class RolloutEngineError(RuntimeError):
    """The rollout engine (vLLM, ``models/vllm_rollout.py``) could not start, exited, or refused a
    request (a weight sync, a generation): the job fails with ``rollout_engine_failed``, never samples on
    with another engine or with stale weights."""


# An endpoint's name as an admin writes it in BEAVER_ENDPOINTS and a job names it: a plain word, so a
# job's params can never hold a URL, a host or a port.
ENDPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible HTTP endpoint an admin allowed jobs to call (``BEAVER_ENDPOINTS``), with
    its own credential. A job names it; the worker resolves the name from its own settings."""

    name: str
    url: str  # base URL of its OpenAI API, e.g. http://guard:8000/v1
    model: str  # the model name sent in each request
    api_key: str | None = field(default=None, repr=False)  # sent as a Bearer token; never shown
    api_key_file: str | None = None  # or: a file holding the key (read by the worker when the job runs)


# --- bounds: every size a job accepts is declared next to its field --------------------------------------
# ``steps: Annotated[int, Bound(ge=1, cap="steps")] = 100``: ``build_config`` checks it (at POST /v1/jobs
# and again in the worker), the params reference and /openapi.json show it. A ``cap`` is an upper bound an
# admin sets: the API's ``BEAVER_MAX_JOB_<CAP>`` setting, checked at POST only (``caps``), so a job already
# accepted still runs after an admin lowers it; a worker, a test or a notebook builds configs without caps.
# Bounds that need the job's models or datasets (tokens by the model's context, answers and optimizer
# steps counted from the datasets' records) are ``check_size``'s, also at POST.

CAPS = ("tokens", "samples", "steps", "batch")  # BEAVER_MAX_JOB_TOKENS, _SAMPLES, _STEPS, _BATCH


def cap_setting(cap: str) -> str:
    """The setting an admin raises a cap with."""
    return f"BEAVER_MAX_JOB_{cap.upper()}"


@dataclass(frozen=True)
class Bound:
    """The declared range of a param. Numbers: ``ge`` / ``gt`` below, ``le`` / ``lt`` or ``cap`` above;
    strings (characters) and lists (items): ``min_length`` … ``max_length`` (a list's items carry their
    own bounds)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    cap: str | None = None  # one of CAPS: the upper bound is an admin's setting
    min_length: int | None = None
    max_length: int | None = None

    def problem(self, value, caps: dict | None = None) -> str | None:
        """Why ``value`` is out of bounds (the end of a message), or None."""
        if value is None:
            return None
        if isinstance(value, (str, list, tuple)):
            what = "characters" if isinstance(value, str) else "items"
            if self.min_length is not None and len(value) < self.min_length:
                return f"must have at least {self.min_length} {what[:-1] if self.min_length == 1 else what}, " \
                       f"got {len(value)}"
            if self.max_length is not None and len(value) > self.max_length:
                return f"must have at most {self.max_length:,} {what}, got {len(value):,}"
            return None
        for limit, ok, word in ((self.ge, lambda lo: value >= lo, "≥"), (self.gt, lambda lo: value > lo, ">"),
                                (self.le, lambda hi: value <= hi, "≤"), (self.lt, lambda hi: value < hi, "<")):
            if limit is not None and not ok(limit):
                return f"must be {word} {_number(limit)}, got {_number(value)}"
        if self.cap is not None and caps is not None and value > caps[self.cap]:
            return (f"must be ≤ {_number(caps[self.cap])} (this server's {cap_setting(self.cap)}, which an admin "
                    f"may raise), got {_number(value)}")
        return None

    def schema(self, caps: dict | None = None) -> dict:
        """JSON Schema keywords (the caps as ``caps`` has them)."""
        out = {"minimum": self.ge, "exclusiveMinimum": self.gt, "maximum": self.le, "exclusiveMaximum": self.lt}
        if self.cap is not None and caps is not None:
            out["maximum"] = caps[self.cap]
        return {k: v for k, v in out.items() if v is not None}

    def text(self, unit: str = "") -> str:
        """The bound as the params reference shows it (``unit``: "characters" or "items" for lengths)."""
        if unit:
            low, high = self.min_length or 0, self.max_length
            return f"{low}–{high:,} {unit}" if low else f"≤ {high:,} {unit}"
        low = f"≥ {_number(self.ge)}" if self.ge is not None else f"> {_number(self.gt)}" if self.gt is not None \
            else ""
        high = f"≤ {_number(self.le)}" if self.le is not None else f"< {_number(self.lt)}" if self.lt is not None \
            else f"≤ `{cap_setting(self.cap)}`" if self.cap is not None else ""
        return ", ".join(p for p in (low, high) if p)


def _number(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        x = int(x)
    if isinstance(x, int) and x >= 2 ** 32 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


# Bounds several configs share.
MODEL_REF = Bound(min_length=1, max_length=1000)  # a model id or name, a round name, a local path or a hub id
NAME = Bound(max_length=200)  # names, as everywhere in the API
TEMPLATE = Bound(max_length=65536)  # a Jinja chat template (64 KiB)
SEED = Bound(ge=0, lt=2 ** 63)  # torch and numpy take these
TOKENS = Bound(ge=1, cap="tokens")  # tokens per sequence; also ≤ the model's context (check_size)
BATCH = Bound(ge=1, cap="batch")  # sequences per batch
UNIT = Bound(ge=0, lt=1)  # a share of something: [0, 1)


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
    # an admin-named outbound endpoint (BEAVER_ENDPOINTS) by name -> its URL, model and key; raises
    # ValueError for a name this worker does not know.
    resolve_endpoint: Callable[[str], Endpoint] = lambda name: _no_endpoints(name)
    # the Python of the environment that has vLLM (BEAVER_VLLM_PYTHON), for rollout_engine vllm / auto;
    # "": this Python.
    vllm_python: str = ""

    def __post_init__(self):
        if self.stop_requested is None:
            self.stop_requested = self.should_stop

    def check_cancel(self) -> None:
        if self.should_stop():
            raise JobCancelled("cancelled")


def _no_endpoints(name: str) -> Endpoint:
    raise ValueError(f"endpoint {name!r} is not configured here (no endpoints are)")


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
    # dotted params that name an admin-configured outbound endpoint (e.g. "judge.endpoint"); checked
    # against BEAVER_ENDPOINTS when the job is created. A job reaches nothing else.
    endpoints: tuple[str, ...] = ()

    def config_class(self) -> type:
        return _load(self.config)

    def entry_point(self) -> Callable[[Any, JobContext], JobResult]:
        return _load(self.entry)


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


_PPO_MODELS = (("model", "causal"), ("reward_model", "score"), ("cost_model", "score"), ("cost_models", "score"),
               ("reward_critic", "any"), ("cost_critic", "any"))
_PPO_DATA = ("prompt", "preference", "sft")  # prompts from prompt/preference records; sft records feed PTX
_GRPO_MODELS = tuple((name, kind) for name, kind in _PPO_MODELS if not name.endswith("_critic"))  # no critics

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
    "cost": JobType("models.score_training:CostTrainingConfig", "models.score_training:run_cost", "gpu",
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
                        default_judges=True, endpoints=("judge.endpoint",),
                        summary="rounds' answers to your prompts, scored by one reference reward/cost pair: harmful "
                                "ratio, reward, cost, refusals, win rates and the 2 × 2 table, with 95 % intervals."),
    "ppo_lag": JobType("models.ppo_lag:PPOLagConfig", "models.ppo_lag:run_ppo_lag", "gpu", _PPO_MODELS, _PPO_DATA,
                       (("objective", "lagrangian"),),
                       multi_rank=True,
                       summary="a Safe RLHF round: PPO-Lagrangian, reward maximised while J̄_C ≤ `threshold` (or each "
                               "constraint of `cost_models`), λ learned."),
    "ppo": JobType("models.ppo_lag:PPOLagConfig", "models.ppo_lag:run_ppo", "gpu", _PPO_MODELS, _PPO_DATA,
                   (("objective", "reward"),), multi_rank=True,
                   summary="baseline: PPO on the reward alone (the cost is scored for telemetry)."),
    "ppo_shaping": JobType("models.ppo_lag:PPOLagConfig", "models.ppo_lag:run_ppo_shaping", "gpu", _PPO_MODELS,
                           _PPO_DATA, (("objective", "shaping"),),
                           multi_rank=True, summary="baseline: PPO on a fixed `R − shaping_lambda·C`."),
    "grpo_lag": JobType("models.grpo_lag:GRPOLagConfig", "models.grpo_lag:run_grpo_lag", "gpu", _GRPO_MODELS,
                        _PPO_DATA, (("objective", "lagrangian"),), multi_rank=True,
                        summary="a critic-free Safe RLHF round: GRPO-Lagrangian, `group_size` answers per prompt, "
                                "reward and cost normalised within the group, λ learned as in ppo_lag."),
    "grpo": JobType("models.grpo_lag:GRPOLagConfig", "models.grpo_lag:run_grpo", "gpu", _GRPO_MODELS, _PPO_DATA,
                    (("objective", "reward"),), multi_rank=True,
                    summary="baseline: GRPO on the reward alone (the cost is scored for telemetry)."),
}


def register(name: str, job_type: JobType) -> None:
    JOB_TYPES[name] = job_type


def parse_params(job_type: str, params: dict | None, caps: dict | None = None) -> Any:
    """Build the config dataclass of ``job_type`` from ``params``; unknown, mistyped or out-of-bounds
    fields raise ``ParamsError`` naming the field (``caps``: the admin's caps, checked at POST)."""
    if job_type not in JOB_TYPES:
        raise ParamsError(f"unknown job type {job_type!r}; known: {', '.join(sorted(JOB_TYPES))}", "type")
    spec = JOB_TYPES[job_type]
    params = dict(params or {})
    for name, value in spec.fixed:
        if name in params and params[name] != value:
            raise ParamsError(f"params.{name} is set by the job type {job_type!r}", f"params.{name}")
        params[name] = value
    return build_config(spec.config_class(), params, caps=caps)


def model_refs(job_type: str, config: Any) -> list[tuple[str, str, str]]:
    """(param, reference, expected kind) of every model a job's config names."""
    refs = []
    for name, kind in JOB_TYPES[job_type].models:
        value = getattr(config, name, None)
        if isinstance(value, list):  # e.g. evaluate's models, or PPO's cost_models ({model, threshold, name})
            refs += [(f"{name}[{i}].model", ref.model, kind) if hasattr(ref, "model") else (f"{name}[{i}]", ref, kind)
                     for i, ref in enumerate(value)]
        elif value:
            refs.append((name, value, kind))
    return refs


def endpoint_refs(job_type: str, config: Any) -> list[tuple[str, str]]:
    """(param, endpoint name) of every outbound endpoint a job's config names."""
    refs = []
    for dotted in JOB_TYPES[job_type].endpoints:
        value = config
        for part in dotted.split("."):
            value = getattr(value, part, None)
        if value:
            refs.append((dotted, value))
    return refs


def check_size(job_type: str, config: Any, records: int, contexts: dict[str, int | None], caps: dict) -> None:
    """The bounds that need the job's models and datasets, checked at POST /v1/jobs (``ParamsError``):

    - tokens by the model's context (``contexts``: model param → its context in tokens, None when
      unknown, e.g. a hub model not in the cache: then the tokens cap alone): an answer leaves room for
      a prompt (``sampling.max_new_tokens`` < the context of every policy that samples); ``max_length``
      fits every model that reads whole conversations (all of a training job's, evaluate's reward and
      cost models); PPO's prompt and answer share ``max_length`` (``max_new_tokens`` < ``max_length``);
    - answers a generate or evaluate job produces, prompts × ``samples_per_prompt`` × models (``records``:
      the datasets' records, an upper bound of the prompts), ≤ the samples cap;
    - optimizer steps of sft, dpo, reward and cost, ``epochs`` × ⌈records / ``batch_size``⌉, ≤ the steps cap
      (PPO's ``steps`` is declared against it directly)."""
    from models.training import TrainingConfig  # torch: an API process has it loaded already

    training = isinstance(config, TrainingConfig)
    sampling = getattr(config, "sampling", None)
    max_length = getattr(config, "max_length", None)
    for param, ref, kind in model_refs(job_type, config):
        context = contexts.get(param)
        if context is None:
            continue
        if sampling is not None and kind == "causal" and sampling.max_new_tokens >= context:
            raise ParamsError(f"params.sampling.max_new_tokens ({sampling.max_new_tokens:,}) must leave room for a "
                              f"prompt within the context of params.{param} ({ref!r}: {context:,} tokens)",
                              "params.sampling.max_new_tokens")
        if max_length is not None and (training or kind != "causal") and max_length > context:
            raise ParamsError(f"params.max_length ({max_length:,}) is longer than the context of params.{param} "
                              f"({ref!r}: {context:,} tokens)", "params.max_length")
    if training and sampling is not None and sampling.max_new_tokens >= max_length:
        raise ParamsError(f"params.sampling.max_new_tokens ({sampling.max_new_tokens:,}) must be below max_length "
                          f"({max_length:,}): a rollout's prompt and answer share max_length",
                          "params.sampling.max_new_tokens")
    if hasattr(config, "samples_per_prompt"):
        prompts = min(records, config.max_prompts or records) if hasattr(config, "max_prompts") else records
        models = len(config.models) if hasattr(config, "models") else 1
        answers = prompts * config.samples_per_prompt * models
        if answers > caps["samples"]:
            raise ParamsError(f"{job_type} would produce up to {prompts:,} prompts × {config.samples_per_prompt:,} "
                              f"samples_per_prompt × {models} model(s) = {answers:,} answers, more than this server's "
                              f"{cap_setting('samples')} ({caps['samples']:,}): fewer prompts or samples",
                              "params.samples_per_prompt")
    if hasattr(config, "epochs") and hasattr(config, "batch_size"):
        steps = config.epochs * -(-records // config.batch_size)
        if steps > caps["steps"]:
            raise ParamsError(f"{job_type} would run {config.epochs:,} epochs × ⌈{records:,} records / "
                              f"{config.batch_size:,}⌉ = {steps:,} optimizer steps, more than this server's "
                              f"{cap_setting('steps')} ({caps['steps']:,})", "params.epochs")


def build_config(cls: type, params: dict, prefix: str = "params", caps: dict | None = None) -> Any:
    """Recursively build a (possibly nested) config dataclass from a dict, checking types and bounds."""
    if not isinstance(params, dict):
        raise ParamsError(f"{prefix} must be an object", prefix)
    hints = typing.get_type_hints(cls, include_extras=True)
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
        kwargs[name] = _coerce(hints[name], value, f"{prefix}.{name}", caps)
    try:
        config = cls(**kwargs)
    except ParamsError as e:  # a config's own check naming its field: made absolute
        where = f"{prefix}.{e.param}" if e.param else prefix
        raise ParamsError(f"{where}: {e}", where) from e
    except (TypeError, ValueError) as e:
        raise ParamsError(f"{prefix}: {e}", prefix) from e
    return config


def _coerce(hint, value, where: str, caps: dict | None = None):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        value = _coerce(args[0], value, where, caps)
        for bound in (a for a in args[1:] if isinstance(a, Bound)):
            if (problem := bound.problem(value, caps)) is not None:
                raise ParamsError(f"{where} {problem}", where)
        return value
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, where, caps)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, caps)
            except ParamsError as e:
                errors.append(e)
        # The first alternative's error, naming the field it found (params.judge.unsafe_pattern, not params.judge).
        raise errors[0] if errors else ParamsError(f"{where}: bad value", where)
    if origin is typing.Literal:
        if value not in args:
            raise ParamsError(f"{where} must be one of {list(args)}, got {value!r}", where)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where} must be a list", where)
        inner = args[0] if args else typing.Any
        items = [_coerce(inner, v, f"{where}[{i}]", caps) for i, v in enumerate(value)]
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


def _bounds_text(hint) -> str:
    """A param's bounds as the params reference shows them: "≥ 1, ≤ `BEAVER_MAX_JOB_BATCH`", "≤ 200 characters"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        inner = args[0]
        listed = typing.get_origin(inner) in (list, tuple)
        unit = "characters" if inner is str else "items" if listed else ""
        own = "; ".join(b.text(unit) for b in args[1:] if isinstance(b, Bound))
        each = _bounds_text(typing.get_args(inner)[0]) if listed else ""
        return own + (f", each {each}" if each else "")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return "; ".join(t for t in (_bounds_text(a) for a in args if a is not type(None)) if t)
    if origin in (list, tuple) and args and (each := _bounds_text(args[0])):
        return f"each {each}"
    return ""


def json_schema(hint, caps: dict | None = None) -> dict:
    """The JSON Schema of a param's type with its declared bounds (the caps as ``caps`` has them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        schema = json_schema(args[0], caps)
        for bound in (a for a in args[1:] if isinstance(a, Bound)):
            if args[0] is str or typing.get_origin(args[0]) in (list, tuple):
                names = ("minLength", "maxLength") if args[0] is str else ("minItems", "maxItems")
                schema.update({k: v for k, v in zip(names, (bound.min_length, bound.max_length)) if v is not None})
            else:
                schema.update(bound.schema(caps))
        return schema
    if dataclasses.is_dataclass(hint):
        return config_schema(hint, caps)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        options = [json_schema(a, caps) for a in args if a is not type(None)]
        options += [{"type": "null"}] if type(None) in args else []
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        return {"type": "array", "items": json_schema(args[0], caps) if args else {}}
    if origin is dict or hint is dict:
        return {"type": "object"}
    return {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
            bool: {"type": "boolean"}}.get(hint, {})


def config_schema(cls: type, caps: dict | None = None, fixed: dict | None = None) -> dict:
    """The JSON Schema of a config dataclass: every field with its bounds, description and default; a field
    whose default is out of its own bounds (``model: ""``) is required; ``fixed`` params as constants."""
    import json

    hints, docs = typing.get_type_hints(cls, include_extras=True), field_docs(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        fixed_value = (fixed or {}).get(f.name, dataclasses.MISSING)
        schema = json_schema(hints[f.name], caps) if fixed_value is dataclasses.MISSING else {"const": fixed_value}
        if docs.get(f.name):
            schema["description"] = docs[f.name]
        properties[f.name] = schema
        if fixed_value is not dataclasses.MISSING:
            continue
        default = json.loads(json.dumps(config_to_dict(d) if dataclasses.is_dataclass(d := _default(f)) else d))
        try:
            _coerce(hints[f.name], default, f.name)
            schema["default"] = default
        except ParamsError:
            required.append(f.name)
    return {"type": "object", "title": cls.__name__, "properties": properties, "additionalProperties": False,
            **({"required": required} if required else {})}


def params_schema(job_type: str, caps: dict | None = None) -> dict:
    """The JSON Schema of a job type's ``params`` (for /openapi.json)."""
    spec = JOB_TYPES[job_type]
    return config_schema(spec.config_class(), caps, fixed=dict(spec.fixed))


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
    bounded = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rows = ["| param | type | bounds | default | meaning |", "|---|---|---|---|---|"]
    for name in names:
        nested = [a for a in (hints[name], *typing.get_args(hints[name])) if dataclasses.is_dataclass(a)]
        doc = docs.get(name, "")
        if nested and not doc:
            doc = f"see `{nested[0].__name__}` below"
        rows.append(f"| `{name}` | {_type_name(hints[name])} | {_bounds_text(bounded[name])} | "
                    f"{_json(_default(fields[name]))} | {doc} |")
    return rows


def params_markdown() -> str:
    """Every job type's params as Markdown tables: the shared training params once, then each job's own,
    then the nested objects (``optim``, ``lora``, ``sampling``, ``cost_models``' entries)."""
    from models.evaluate import JudgeConfig
    from models.generation import SamplingConfig
    from models.ppo_lag import CostModelSpec
    from models.rollout import RolloutParams
    from models.training import LoraConfig, OptimConfig, TrainingConfig

    shared = [f.name for f in dataclasses.fields(TrainingConfig)]
    rollout = [f.name for f in dataclasses.fields(RolloutParams)]
    samplers = [name for name, spec in JOB_TYPES.items() if issubclass(spec.config_class(), RolloutParams)]
    lines = ["Every bound is checked at `POST /v1/jobs` (422 naming the param). `BEAVER_MAX_JOB_*` are caps an admin "
             "sets (see Configuration); token lengths are also bounded by the model's context, and a job's answers "
             "and optimizer steps, counted from its datasets, by the samples and steps caps.", "",
             "**Every training job** (sft, dpo, reward, cost, ppo_lag, ppo, ppo_shaping, grpo_lag, grpo) takes:", ""]
    lines += _table(TrainingConfig, shared)
    lines += ["", f"**Every job that samples** ({', '.join(samplers)}) takes the rollout engine's params (see "
              "[Rollout engines](#rollout-engines)):", ""]
    lines += _table(RolloutParams, rollout)
    shown: dict[type, str] = {}
    for name, spec in JOB_TYPES.items():
        cls = spec.config_class()
        training = issubclass(cls, TrainingConfig)
        if cls in shown:  # ppo and ppo_shaping share ppo_lag's config
            lines += ["", f"**`{name}`** — {spec.summary} The same params as `{shown[cls]}`."]
            continue
        base = next((b for b in cls.__mro__[1:] if b in shown), None)  # cost extends reward's config
        also = f" The params of `{shown[base]}`, and:" if base else " Also the training params above." if training \
            else ""
        lines += ["", f"**`{name}`** — {spec.summary}{also}"]
        shown[cls] = name
        fixed = {k for k, _ in spec.fixed}
        inherited = {f.name for f in dataclasses.fields(base)} if base else set()
        own = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed and f.name not in inherited
               and not (training and f.name in shared) and f.name not in rollout]
        lines += [""] + _table(cls, own)
    for title, cls in (("`optim` / `actor_optim` / `critic_optim` (OptimConfig)", OptimConfig),
                       ("`lora` (LoraConfig)", LoraConfig), ("`sampling` (SamplingConfig)", SamplingConfig),
                       ("`judge` (evaluate's JudgeConfig)", JudgeConfig),
                       ("`cost_models` entries (CostModelSpec)", CostModelSpec)):
        lines += ["", f"**{title}** — {(cls.__doc__ or '').strip().splitlines()[0].replace('``', '`')}", ""]
        lines += _table(cls, [f.name for f in dataclasses.fields(cls)])
    return "\n".join(lines) + "\n"
