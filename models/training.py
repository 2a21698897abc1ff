"""What every trainer shares — SFT, DPO, reward/cost and PPO-Lag import it, none re-implements it.

- config pieces, by composition: ``TrainingConfig`` (the fields every training job has: the model,
  precision, LoRA, gradient checkpointing, the chat template, …) and ``OptimConfig``;
- precision: trainable weights stay float32 (the master copy AdamW updates) and compute runs under
  autocast in the job's ``dtype``; frozen models (reference, reward, cost) are loaded in that dtype
  with no gradients; artifacts are saved in it;
- model loading with LoRA (``peft``; merged on save, so an artifact is a plain HF model) and
  gradient checkpointing; the optimiser with its cosine schedule and gradient clipping (and loss
  scaling for float16); checkpoints that a re-queued job resumes from; micro-batches.

Memory per parameter, for the README's arithmetic: a trainable model costs 16 bytes (float32
weight, gradient and two Adam moments), a frozen half-precision one 2 bytes, a LoRA-wrapped model 2
bytes plus 16 per adapter parameter.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterator, Literal, Sequence

import torch

from models import distributed
from models.chat_format import ChatFormat, TemplateRefused, as_messages
from models.jobs import BATCH, MODEL_REF, SEED, TEMPLATE, UNIT, Bound, ParamsError
from models.loading import load_causal_lm, load_score_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]  # workers/trackers.py


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to 0; weight decay on matrices only."""

    lr: Annotated[float, Bound(gt=0, le=1)] = 1e-5
    """Peak learning rate."""
    weight_decay: Annotated[float, Bound(ge=0, le=10)] = 0.0
    """AdamW weight decay (never on biases and norm gains)."""
    warmup_ratio: Annotated[float, UNIT] = 0.03
    """Share of the optimizer steps with a linear warm-up."""
    max_grad_norm: Annotated[float, Bound(ge=0, le=1e6)] = 1.0
    """Gradient clipping norm (0: off)."""
    scheduler: Literal["cosine", "constant"] = "cosine"
    """Decay after the warm-up: cosine to 0, or constant."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError("lr must be > 0")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be ≥ 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")


@dataclass
class LoraConfig:
    """Low-rank adapters (``peft``) instead of full fine-tuning; merged into the weights on save."""

    r: Annotated[int, Bound(ge=1, le=4096)] = 16
    """Rank of the adapters."""
    alpha: Annotated[float, Bound(gt=0, le=1e6)] = 32.0
    """Scale: the update is (alpha / r)·B·A."""
    dropout: Annotated[float, UNIT] = 0.0
    """Dropout on the adapters' input."""
    target_modules: Annotated[list[Annotated[str, Bound(min_length=1, max_length=200)]],
                              Bound(min_length=1, max_length=256)] | None = None
    """Module names to adapt (e.g. ["q_proj", "v_proj"]); default every linear layer."""

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("lora needs r ≥ 1, alpha > 0 and dropout in [0, 1)")


@dataclass
class TrainingConfig:
    """The params every training job takes (sft, dpo, reward, cost, ppo_lag, ppo, ppo_shaping, grpo_lag, grpo)."""

    model: Annotated[str, MODEL_REF] = ""
    """The model the job starts from: a registered model id or name, a round name, a local Hugging Face
    folder or a hub id."""
    dtype: Dtype = "auto"
    """Compute precision: float32, bfloat16 or float16 (auto: bfloat16 on a GPU that has it, else
    float32). Trainable weights keep a float32 master copy; frozen models and artifacts use this dtype."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    lora: LoraConfig | None = None
    """Train low-rank adapters instead of every weight (null: full fine-tuning)."""
    chat_template: Annotated[str, TEMPLATE] | None = None
    """A Jinja chat template to train with instead of the model's own (saved with the artifact)."""
    max_length: Annotated[int, Bound(ge=8, cap="tokens")] = 512
    """Tokens per conversation. sft (and PPO's PTX records): a longer one is cut at its end, and a record left with no
    assistant token is skipped and counted (`data/skipped_no_target`; none left: `invalid_input`). reward, cost, dpo
    and the score models in PPO: a longer one keeps the chat template's head and the whole answer and loses prompt
    tokens from the left; a pair whose answer does not fit even so is skipped and counted (`data/skipped_too_long`;
    none left: `invalid_input`). PPO leaves out prompts longer than `max_length` − `sampling.max_new_tokens`."""
    micro_batch_size: Annotated[int, BATCH] | None = None
    """Sequences per forward pass; a larger batch is split and its gradients accumulated (null: the whole batch)."""
    seed: Annotated[int, SEED] = 42
    """Seeds initialisation, data order and sampling."""
    checkpoint_every: Annotated[int, Bound(ge=0, cap="steps")] = 0
    """Save a checkpoint every this many optimizer steps (0: never); a re-queued job resumes from the last one."""
    zero_stage: Annotated[int, Bound(ge=0, le=3)] = 0
    """DeepSpeed ZeRO stage of a job on several ranks (`world_size`): 0 plain data parallelism (every rank holds
    everything), 1 Adam's moments sharded over the ranks, 2 the gradients too, 3 the weights too (frozen models
    under ZeRO-3 inference; whole weights gathered on save)."""
    zero_offload: bool = False
    """With `zero_stage` ≥ 1: keep Adam's states in CPU memory (stage 3: the weights and the frozen models too)."""
    report_to: Annotated[list[Tracker], Bound(max_length=3)] = field(default_factory=list)
    """Experiment trackers that also log the job's metrics, under its events' names (`train/loss`, `lagrange/lambda`,
    …), and its params: `tensorboard` (event files among the job's files, in `tensorboard/`), `wandb` and `mlflow`
    (set up by the worker's own `WANDB_*` and `MLFLOW_TRACKING_URI`; the `trackers` extra). A tracker that cannot
    start or fails is turned off with an event saying why; the job goes on."""

    def __post_init__(self):
        if not self.model:
            raise ValueError("model is required")
        if len(set(self.report_to)) != len(self.report_to):
            raise ParamsError(f"report_to names a tracker twice: {self.report_to}", "report_to")
        if self.max_length < 8:
            raise ValueError("max_length must be ≥ 8")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be ≥ 1")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be ≥ 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError("zero_stage must be 0, 1, 2 or 3")
        if self.zero_offload and not self.zero_stage:
            raise ValueError("zero_offload needs zero_stage ≥ 1")


# --- device and precision ---------------------------------------------------------------------------


def get_device() -> torch.device:
    """This rank's device: the GPU of ``LOCAL_RANK`` (one process per GPU), or the CPU."""
    return distributed.device(distributed.current())


def compute_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype of a job's ``dtype`` param on ``device`` ("auto" → bfloat16 on a GPU with it)."""
    if name == "auto":
        device = device or get_device()
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for forward passes (nothing to do in float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# --- models ------------------------------------------------------------------------------------------


def load_trainable(path: str | Path, kind: Literal["causal", "score"], fmt: ChatFormat, config: TrainingConfig,
                   device: torch.device, adapter: str | Path | None = None):
    """A model to train: float32 master weights (full fine-tuning), or frozen weights in the compute
    dtype with float32 LoRA adapters (``adapter``: resume from saved adapters); gradient
    checkpointing on request. Score models keep their head trainable under LoRA."""
    dtype = compute_dtype(config.dtype, device)
    loader = load_causal_lm if kind == "causal" else load_score_model
    model = loader(path, fmt.tokenizer, dtype=dtype if config.lora else torch.float32)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if config.lora:
        model = with_lora(model, config.lora, kind, adapter)
    return model.to(device)


def without_dropout(model):
    """Dropout off for good, so a model can stay in train mode — where Hugging Face's gradient
    checkpointing acts (it is skipped in eval mode) — while PPO's ratio π_θ/π_old and DPO's margin
    start at exactly 1 and 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(unwrap(model), "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "attention_probs_dropout_prob",
                 "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return model.train()


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant (works with frozen inputs and LoRA)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x's name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def start_policy(config: TrainingConfig, ctx, checkpoint_name: str = "", padding_side: str = "right"):
    """What SFT, DPO and PPO start from: the job's policy as a trainable model (resumed from
    ``checkpoint_name`` in the job's last checkpoint, if any), its chat format, the device and the
    compute dtype. Returns ``(fmt, model, device, dtype, base_path)``."""
    base = ctx.resolve_model(config.model)
    weights, adapter = checkpoint_source(ctx.resume_from, checkpoint_name, base)
    fmt = ChatFormat.load(base, config.chat_template, padding_side=padding_side)
    device = get_device()
    model = load_trainable(weights, "causal", fmt, config, device, adapter=adapter)
    return fmt, model, device, compute_dtype(config.dtype, device), base


def with_lora(model, lora: LoraConfig, kind: str, adapter: str | Path | None = None):
    """Wrap ``model`` in LoRA adapters (``peft``), or load saved ones from ``adapter``."""
    try:
        import peft
    except ImportError as e:  # pragma: no cover — peft is a dependency
        raise RuntimeError("lora needs the peft package") from e
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    else:
        config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules or "all-linear",
                                 task_type="SEQ_CLS" if kind == "score" else "CAUSAL_LM",
                                 modules_to_save=["score"] if kind == "score" else None)
        model = peft.get_peft_model(model, config)
    for p in model.parameters():  # adapters (and a score head's trainable copy) keep float32 masters
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def load_frozen(path: str | Path, kind: Literal["causal", "score"], fmt: ChatFormat, dtype: torch.dtype,
                device: torch.device):
    """A model that is only read (reference policy, reward or cost model): compute dtype, eval, no grads."""
    loader = load_causal_lm if kind == "causal" else load_score_model
    model = loader(path, fmt.tokenizer, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model


def unwrap(model):
    """The Hugging Face model under a PEFT or DeepSpeed wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapters_disabled(model):
    """Context in which a LoRA model computes as its frozen base (the reference policy, or the
    reward/cost model a critic was initialised from); a no-op for a plain model."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def save_artifact(model, fmt: ChatFormat, path: str | Path, dtype: torch.dtype) -> Path:
    """Save ``model`` as a plain Hugging Face folder in ``dtype`` (LoRA merged in) with its tokenizer,
    chat template and eos ids. On several ranks every rank calls it (under ZeRO-3 the whole weights
    are gathered first) and rank 0 writes. The model is not for training after this."""
    path = Path(path)
    with distributed.gathered(model):
        if distributed.current().main:
            model = merged(model)
            model.config.use_cache = True
            model.to(dtype)
            with written_whole(path) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                fmt.save(tmp)
    distributed.barrier()
    return path


def _is_peft(model) -> bool:
    return hasattr(model, "merge_and_unload")


def merged(model):
    """The plain model of a (possibly LoRA-wrapped, possibly DeepSpeed-wrapped) trainable model."""
    model = getattr(model, "module", model)
    return model.merge_and_unload() if _is_peft(model) else model


# --- optimisation --------------------------------------------------------------------------------------


def make_optimizer(model, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; decay on matrices only (decaying biases and norm gains
    pulls them towards 0 for no gain)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=optim.lr)


def make_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to 0 (or constant)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = math.ceil(optim.warmup_ratio * total_steps)
    if optim.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


class Stepper:
    """One model's optimiser step: backward (loss-scaled in float16), clip, step, schedule.

    On several ranks, or with ``zero_stage`` > 0, DeepSpeed's engine owns the gradients: averaged
    over the ranks at the step's last micro-batch, partitioned by ZeRO stage 1–3 (stage 0: plain
    data parallelism), clipped, stepped. ``backward(loss, last=)`` says which micro-batch is the last:
    the loop knows, the engine must (it reduces there). ``step`` then ends the step either way.
    Forward passes call the model itself (its ZeRO hooks gather what is sharded), not the engine."""

    def __init__(self, model, optim: OptimConfig, total_steps: int, dtype: torch.dtype, device: torch.device,
                 zero_stage: int = 0, cpu_offload: bool = False):
        self.model, self.optim, self.zero_stage = model, optim, zero_stage
        self.optimizer = make_optimizer(model, optim)
        self.scheduler = make_scheduler(self.optimizer, optim, total_steps)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.engine = None
        if distributed.current().distributed or zero_stage:
            if dtype == torch.float16:
                raise ValueError("dtype float16 is not supported on several ranks or with zero_stage: use bfloat16")
            deepspeed = distributed.import_deepspeed()
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
                config=distributed.deepspeed_config(zero_stage, optim.max_grad_norm, cpu_offload))

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Accumulate ``loss``'s gradients; ``last``: this is the step's final micro-batch."""
        if self.engine is not None:
            # What the engine's forward would do: count a micro-batch, so ZeRO-3 adds this one's
            # gradients to the step's instead of overwriting them.
            if hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
                self.engine.optimizer.clear_backward_seen_flag()
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss, scale_wrt_gas=False)  # the loop already weights micro-batches
            self.engine.step()  # at the boundary: reduce, clip, step, schedule; else only counts
            return
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        if self.engine is not None:
            return  # stepped in backward(last=True)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.optim.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        state = {"scheduler": self.scheduler.state_dict()}
        if not self.zero_stage:  # ZeRO partitions the moments over ranks: a resume restarts them
            state["optimizer"] = self.optimizer.state_dict()
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" in state and not self.zero_stage:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def micro_batches(indices: Sequence[int], size: int | None) -> Iterator[list[int]]:
    """``indices`` in chunks of ``size`` (all at once when None)."""
    indices = list(indices)
    size = size or len(indices) or 1
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


# --- batches of token ids ----------------------------------------------------------------------------


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest → (ids, attention_mask), both (B, L); ``fill`` pads the
    ids instead of ``pad_id`` (labels pad with −100)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


# --- supervised conversations: SFT, DPO and PPO's PTX loss ------------------------------------------

IGNORE = -100  # label of a token that is not a target


def sft_messages(record: dict) -> list[dict]:
    """An sft record (``{"prompt", "response"}`` or ``{"messages"}``) as chat messages."""
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def check_conversations(fmt: ChatFormat, datasets: Sequence[tuple[str, Sequence[dict]]], prompts: bool = False) -> None:
    """Render every record of ``datasets`` (``(dataset id, records)``) as the job will, before it
    trains: an sft record's conversation, a preference record's prompt with each answer, or — with
    ``prompts`` (jobs that generate) — a record's prompt with the generation prompt. A record the
    model's chat template refuses fails the job as ``invalid_input`` naming its dataset and line and
    the template's own message, instead of failing mid-run (or quietly)."""
    for dataset_id, records in datasets:
        for line, record in enumerate(records, start=1):
            if "messages" in record or ("response" in record and not prompts):
                conversations = [(sft_messages(record), False)]
            elif "response_0" in record and not prompts:
                conversations = [(as_messages(record["prompt"]) + [{"role": "assistant", "content": record[k]}], False)
                                 for k in ("response_0", "response_1")]
            elif record.get("prompt"):
                conversations = [(as_messages(record["prompt"]), True)]
            else:
                continue
            for messages, generation_prompt in conversations:
                try:
                    fmt.render(messages, add_generation_prompt=generation_prompt)
                except TemplateRefused as e:
                    raise ValueError(f"dataset {dataset_id}, line {line}: {e}") from None


def labelled_conversation(fmt: ChatFormat, record: dict, max_length: int = 512) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are −100 except on assistant tokens."""
    ids, mask = fmt.conversation(sft_messages(record), max_length)
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def collate_labelled(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs into a batch."""
    input_ids, attention_mask = pad_right([ids for ids, _ in examples], pad_id)
    labels, _ = pad_right([lab for _, lab in examples], pad_id, fill=IGNORE)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the target tokens of ``batch``, and their count."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]  # (B, L-1) token t+1 is predicted at t
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def target_count(examples: Sequence[tuple[list[int], list[int]]]) -> int:
    """Tokens a batch of labelled conversations is trained on (the first token is never predicted)."""
    return sum(sum(t != IGNORE for t in labels[1:]) for _, labels in examples)


def with_targets(examples: Sequence[tuple[list[int], list[int]]], max_length: int, what: str
                 ) -> tuple[list[tuple[list[int], list[int]]], int]:
    """The labelled conversations that keep an assistant token to learn within ``max_length`` (SFT,
    PTX) and how many had none: they are left out and counted, since they would add nothing but a
    loss of 0. None left: ``ValueError`` naming ``what`` and ``max_length``, not a run that
    "succeeds" with loss 0 and registers a copy of its base."""
    kept = [e for e in examples if target_count([e])]
    if examples and not kept:
        raise ValueError(f"none of the {len(examples)} {what} has an assistant token within max_length {max_length} "
                         "(the conversation before the answer is longer): nothing to learn; raise max_length or "
                         "shorten the conversations")
    return kept, len(examples) - len(kept)


# --- checkpoints -------------------------------------------------------------------------------------


@contextlib.contextmanager
def written_whole(final: Path) -> Iterator[Path]:
    """A folder written under a hidden name (``.tmp-<name>``) and renamed to ``final`` (replacing it)
    once complete: a crash mid-write never leaves a half folder under the final name for a resume or
    a registration to pick up, and a write that fails (a full disk) removes what it wrote, so the
    space comes back and no ``.tmp-*`` folder is left behind."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(output_dir: str | Path, step: int, models: dict, fmt: ChatFormat, state: dict) -> Path:
    """``output_dir/checkpoint-{step}`` (the name the worker looks for to resume): each model at full
    precision (a LoRA model: its adapters) with the tokenizer beside it (key ``""``: the directory
    itself), and ``trainer_state.pt``. Written whole or not at all (``written_whole``)."""
    final = Path(output_dir) / f"checkpoint-{step}"
    with distributed.gathered(*models.values()):  # on several ranks: every rank calls, rank 0 writes
        if distributed.current().main:
            with written_whole(final) as tmp:
                for name, model in models.items():
                    getattr(model, "module", model).save_pretrained(tmp / name)
                    fmt.tokenizer.save_pretrained(tmp / name)
                # Through a Python file, so a failed write raises the OS error (ENOSPC …) under
                # PyTorch's "unexpected pos", and the job's error can say the disk is full.
                with open(tmp / "trainer_state.pt", "wb") as f:
                    torch.save({"step": step, **state}, f)
    distributed.barrier()
    return final


def read_checkpoint(checkpoint: str | Path) -> dict:
    return torch.load(Path(checkpoint) / "trainer_state.pt", weights_only=False)


def is_adapter(path: str | Path) -> bool:
    """Whether a checkpointed model folder holds LoRA adapters (not full weights)."""
    return (Path(path) / "adapter_config.json").is_file()


def checkpoint_source(checkpoint: str | Path | None, name: str, base: str | Path) -> tuple[str | Path, str | Path | None]:
    """Where a model resumes from: (weights to load, adapters on top or None). A full-weight
    checkpoint replaces ``base``; an adapter checkpoint goes on top of it."""
    if checkpoint is None:
        return base, None
    folder = Path(checkpoint) / name
    return (base, folder) if is_adapter(folder) else (folder, None)

