"""Load models offline from a local Hugging Face directory.

Never reaches a hub (``local_files_only=True``): a model is a directory on disk, found directly or
through the registry (the caller resolves a Beaver model id or a hub id to a path first). Tokenizers
and conversation formats come from ``models.chat_format.ChatFormat.load``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# config.json's names for a model's context window (Llama/Qwen/Mistral, GPT-2, Falcon, ChatGLM …).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embedding matrix for tokens the tokenizer added; new rows are the mean of the old
    ones (``mean_resizing``), so a fresh pad/eos starts as an average token, not noise. The config's
    eos ids are left alone: they may be a list (``generation_config`` reads them)."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(path: str | Path, tokenizer=None, dtype: torch.dtype | str | None = None):
    """``AutoModelForCausalLM`` from a local directory in ``dtype`` ("auto": the checkpoint's own),
    embeddings fitted to ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype or torch.float32)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    # ``logits_to_keep`` hands the LM head a non-contiguous slice of the hidden states; for a head
    # whose weight needs no gradient (a frozen bf16 model, a LoRA base) torch.matmul then expands
    # the weight to (B, H, V) and the CPU bf16 path copies it: 1.3 GiB per forward in
    # bench/memory.py. A contiguous (B, T, H) input costs a few MiB and avoids it.
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return model


def _contiguous_input(_module, args):
    return (args[0].contiguous(), *args[1:])


def load_score_model(path: str | Path, tokenizer=None, dtype: torch.dtype | str | None = None):
    """A score model (``*ForSequenceClassification``, ``num_labels=1``) from a local directory; a
    plain causal-LM checkpoint gets a fresh linear head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), local_files_only=True, num_labels=1, dtype=dtype or torch.float32)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model


# --- what a folder is ------------------------------------------------------------------------------
# Registering a folder as a reward/cost model must not mean scoring with a head that
# ``load_score_model`` initialises at random, nor a policy mean a score model: the folder's config
# and its checkpoint's tensor names say what it is, without loading any weight.

SCORE_HEAD_SUFFIX = "ForSequenceClassification"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def checkpoint_keys(path: str | Path) -> set[str] | None:
    """Names of the tensors a folder's checkpoint holds (safetensors or PyTorch, single or sharded),
    read from the index or the file headers; None when it has no checkpoint Beaver can read."""
    import json

    path = Path(path)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            return set(json.loads((path / index).read_text()).get("weight_map", {}))
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return set(f.keys())
    if (path / "pytorch_model.bin").is_file():
        return set(torch.load(path / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True))
    return None


def score_head_keys(path: str | Path) -> list[str]:
    """The tensors a ``*ForSequenceClassification`` of this folder's config has beyond its backbone
    (Llama's ``score.weight``), from a skeleton on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    prefix = model.base_model_prefix + "."
    return [k for k in model.state_dict() if not k.startswith(prefix)]


def kind_problem(path: str | Path, kind: str) -> tuple[str, str] | None:
    """What is wrong with using the folder ``path`` as a ``kind`` ("policy", "reward" or "cost")
    model, as ``(field, message)`` — field "kind" when it is a model of the other kind, "path" when
    it is no usable model of this one — or None when it is one."""
    import json

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    architectures = [a for a in config.get("architectures") or () if isinstance(a, str)]
    score = next((a for a in architectures if a.endswith(SCORE_HEAD_SUFFIX)), None)
    causal = next((a for a in architectures if a.endswith(_CAUSAL_SUFFIXES)
                   or a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()), None)
    if kind == "policy":
        if score:
            return "kind", (f"{path} is a score model ({score}), not a policy (a causal language model): register it "
                            f"as kind reward or cost")
        if architectures and not causal:
            return "path", f"{path} is a {', '.join(architectures)}, not a causal language model a policy can be"
        return None
    if not score:
        if causal:
            return "kind", (f"{path} is a causal language model ({causal}), not a {kind} model: loaded as one, it would "
                            f"score with a randomly initialised head. Train a {kind} model from it with a `{kind}` job "
                            f"(params.model: this folder), or register it as kind policy")
        what = f"a {', '.join(architectures)}" if architectures else "a model without architectures in its config.json"
        return "path", f"{path} is {what}, not a {kind} model (a *{SCORE_HEAD_SUFFIX} with num_labels 1)"
    labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
    if labels != 1:
        return "path", (f"{path} is a {score} with {labels} labels; a {kind} model has one score (num_labels 1): "
                        f"train one with a `{kind}` job")
    try:
        head = score_head_keys(path)
    except Exception as e:  # noqa: BLE001 — what transformers says about a config it cannot build
        return "path", f"{path}: Beaver cannot load it as a {score}: {str(e).splitlines()[0][:300]}"
    keys = checkpoint_keys(path)
    missing = [k for k in head if keys is None or k not in keys]
    if missing:
        return "path", (f"{path} is a {score} whose score head ({', '.join(missing)}) is not in its checkpoint: "
                        f"loaded, it would score with a randomly initialised head. Train a {kind} model with a "
                        f"`{kind}` job")
    return None
def model_context(path: str | Path) -> int | None:
    """A model folder's context window in tokens, read from its files (no weights loaded): config.json's
    ``max_position_embeddings`` (or another name of it; a multimodal model's ``text_config``), else the
    tokenizer's ``model_max_length`` when it is a real length (transformers writes 1e30 for "unset").
    None when neither says."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for section in (config, config.get("text_config") if isinstance(config, dict) else None):
        for key in CONTEXT_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    try:
        length = json.loads((path / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(length) if isinstance(length, (int, float)) and 0 < length < 10_000_000 else None
