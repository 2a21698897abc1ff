"""Benchmark: Beaver's reward-model trainer against TRL's ``RewardTrainer``, side by side.

Same tiny Llama (4 layers, hidden 256, head size 32, random init saved to disk), same synthetic
preference pairs of varied lengths (already tokenised once, so both train on identical ids),
same batch size, steps, learning rate schedule, seed and objective (``−log σ(r_w − r_l)``; Beaver's
L2 term is set to 0 here). Both run float32 on the same device; TRL's defaults that would make
it slower for reasons unrelated to the trainer (gradient checkpointing, CPU bf16 autocast) are
turned off. The two trainers run in one process and take turns every few optimizer steps, each
timed only while it holds the turn, so other load on a shared machine hurts both alike.

Measured: pairs/s over the training loop (model loading, tokenisation and evaluation excluded
for both), and ranking accuracy on the same held-out pairs with the same scoring code.

    .venv/bin/pip install trl datasets accelerate torch==2.13.0   # bench-only dependencies
    .venv/bin/python bench/score_training.py                      # ≈ 5 min on 2 CPU cores
    .venv/bin/python bench/score_training.py --pairs 400 --eval-pairs 100   # a quick look

``--epochs`` > 1 counts Beaver's evaluation after each epoch in its time (TRL evaluates only at the end).

The last line ends with the ratio Beaver/TRL of pairs/s, e.g. ``1.45x``; results also go to
``bench/results/score_training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.chat_format import ChatFormat  # noqa: E402
from models.evaluation import evaluate  # noqa: E402
from models.loading import load_score_model  # noqa: E402
from models.preference import collate_pairs, preference_pairs, tokenize_pairs  # noqa: E402
from models.score_model import end_scores  # noqa: E402
from models.score_training import ScoreTrainingConfig, train  # noqa: E402
from models.tiny import build_tiny_llama  # noqa: E402
from models.training import OptimConfig  # noqa: E402

FILLER = [f"w{i}" for i in range(200)]
GOOD = ["helpful", "clear", "correct", "useful"]
BAD = ["unhelpful", "vague", "wrong", "useless"]


def synthetic_records(n: int, seed: int, max_words: int) -> list[dict]:
    """PKU-SafeRLHF-shaped records: the better response holds one "good" marker word, the worse
    one a "bad" one, at a random place among filler words. Prompt and response lengths are drawn
    log-uniformly, so batches mix short and long sequences as real preference data does."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> list[str]:
        return rng.choices(FILLER, k=int(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    records = []
    for _ in range(n):
        responses = []
        for marker in (rng.choice(GOOD), rng.choice(BAD)):
            text = words(3, max_words)
            text.insert(rng.randint(0, len(text)), marker)
            responses.append(" ".join(text))
        b = rng.randint(0, 1)
        records.append({"prompt": " ".join(words(3, 16)), f"response_{b}": responses[0],
                        f"response_{1 - b}": responses[1], "is_response_0_safe": True, "is_response_1_safe": True,
                        "better_response_id": b, "safer_response_id": b})
    return records


class Turns:
    """Lets two trainers in two threads take turns every few optimizer steps, and clocks each.

    A busy machine (other jobs on the same cores) slows whatever runs at that moment; run one
    trainer after the other and that noise lands on one of them. Taking turns every
    ``every`` steps spreads it evenly. Only one trainer computes at a time, and each one's time
    counts only while it holds the turn (its steps, batching, logging; not loading or eval)."""

    def __init__(self, names: list[str], every: int):
        self.names, self.every = names, every
        self.turn: str | None = None
        self.ready: set[str] = set()
        self.done: set[str] = set()
        self.seconds = {n: 0.0 for n in names}
        self.since = 0.0
        self.cond = threading.Condition()

    def start(self, name: str) -> None:
        """Called by a trainer right before its first step: wait until both are ready and it's our turn."""
        with self.cond:
            self.ready.add(name)
            if self.ready == set(self.names) and self.turn is None:
                self.turn = self.names[0]
            self.cond.notify_all()
            self._wait(name)

    def step_done(self, name: str, step: int, last: bool) -> None:
        """Called after each optimizer step: hand over every ``every`` steps; after the last, stop
        the clock and wait until the other trainer is done too (no overlap with its steps)."""
        if not last and step % self.every:
            return
        with self.cond:
            self.seconds[name] += time.perf_counter() - self.since
            if last:
                self.done.add(name)
            others = [n for n in self.names if n != name and n not in self.done]
            self.turn = others[0] if others else None
            self.cond.notify_all()
            if last:
                self.cond.wait_for(lambda: self.done == set(self.names))
            else:
                self._wait(name)

    def _wait(self, name: str) -> None:
        self.cond.wait_for(lambda: self.turn == name or (self.turn is None and self.done))
        self.since = time.perf_counter()


def run_beaver(args, model_dir: Path, train_records, eval_records, workdir: Path, turns: Turns) -> dict:
    optim = OptimConfig(lr=args.lr, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_grad_norm=1.0)
    config = ScoreTrainingConfig(model=str(model_dir), epochs=args.epochs, optim=optim, batch_size=args.batch_size,
                                 max_length=args.max_length, regularization=0.0, dtype="float32", seed=args.seed,
                                 log_every=1)
    steps = {"n": 0, "loss": 0.0}

    def before_step() -> bool:  # Beaver polls this before every step: our hook to take the turn
        if steps["n"] == 0:
            turns.start("beaver")
        return False

    def after_step(event: dict) -> None:  # log_every=1: one event per step (+ one per evaluation)
        if "train/loss" in event:
            steps["n"] = event["step"]
            steps["loss"] += event["train/loss"]
            turns.step_done("beaver", event["step"], last=event["step"] == event["total_steps"])

    m = train(config, "reward", train_records, workdir, report=after_step, should_stop=before_step,
              eval_records=eval_records)
    return {"steps": m["train/steps"], "accuracy": m["eval/accuracy"], "mean_train_loss": steps["loss"] / steps["n"]}


def run_trl(args, model_dir: Path, train_records, eval_records, workdir: Path, turns: Turns) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    fmt = score_format(model_dir)
    tokenizer = fmt.tokenizer
    train_tok = tokenize_pairs(fmt, preference_pairs(train_records, "reward"), args.max_length)
    eval_pairs = preference_pairs(eval_records, "reward")
    eval_tok = tokenize_pairs(fmt, eval_pairs, args.max_length)
    columns = {"chosen_ids": [p.better_ids for p in train_tok], "rejected_ids": [p.worse_ids for p in train_tok]}
    if args.trl_group_by_length:
        columns["length"] = [p.length for p in train_tok]
    dataset = Dataset.from_dict(columns)
    torch.manual_seed(args.seed)  # the same fresh head as Beaver's
    model = load_score_model(model_dir, tokenizer)
    config = RewardConfig(
        output_dir=str(workdir), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup_ratio,
        weight_decay=args.weight_decay, max_grad_norm=1.0, seed=args.seed, data_seed=args.seed,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        max_length=None, save_strategy="no", eval_strategy="no", report_to="none", logging_steps=10,
        disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if args.trl_group_by_length else "random",
        # the length column must survive the Trainer's column pruning to reach its sampler
        **({"length_column_name": "length", "remove_unused_columns": False} if args.trl_group_by_length else {}))

    class TakeTurns(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            turns.start("trl")

        def on_step_end(self, args, state, control, **kwargs):
            turns.step_done("trl", state.global_step, last=state.global_step == state.max_steps)

    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[TakeTurns()])
    out = trainer.train()
    metrics = evaluate(trainer.model, eval_tok, eval_pairs, "reward", tokenizer.pad_token_id,
                       batch_size=2 * args.batch_size)
    return {"steps": out.global_step, "accuracy": metrics["eval/accuracy"], "mean_train_loss": out.training_loss}


def score_format(model_dir: Path) -> ChatFormat:
    """The conversation format Beaver's reward trainer uses (its pad id never a conversation's last id)."""
    fmt = ChatFormat.load(model_dir)
    fmt.score_padding()
    return fmt


def warm_up(model_dir: Path, train_records, args) -> None:
    """A few untimed optimizer steps on a throwaway model: the first steps of a process pay for
    growing the allocator and starting thread pools, and whichever trainer ran first paid it."""
    fmt = score_format(model_dir)
    tokenizer = fmt.tokenizer
    pairs = tokenize_pairs(fmt, preference_pairs(train_records[: 4 * args.batch_size], "reward"), args.max_length)
    model = load_score_model(model_dir, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for start in range(0, len(pairs), args.batch_size):
        batch = collate_pairs(pairs[start : start + args.batch_size], tokenizer.pad_token_id)
        end_scores(model, batch["input_ids"], batch["attention_mask"]).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_pair(args, model_dir: Path, train_records, eval_records, workdir: Path, first: str) -> dict[str, dict]:
    """Both trainers, in two threads taking turns (``first`` starts); pairs/s from each one's own clock."""
    order = [first, "trl" if first == "beaver" else "beaver"]
    turns = Turns(order, args.switch_every)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def target(name: str) -> None:
        try:
            run = run_beaver if name == "beaver" else run_trl
            results[name] = run(args, model_dir, train_records, eval_records, workdir / name, turns)
        except BaseException as e:  # noqa: BLE001 — surfaced below; the other thread must not hang
            errors.append(e)
            with turns.cond:
                turns.done.update(turns.names)
                turns.turn = None
                turns.cond.notify_all()

    # Set up one after the other (loading and tokenising are not measured and must not overlap a
    # measured step), then let them take turns.
    threads = []
    for name in order:
        thread = threading.Thread(target=target, args=(name,), name=name)
        thread.start()
        threads.append(thread)
        with turns.cond:
            turns.cond.wait_for(lambda: name in turns.ready or errors)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for name, result in results.items():
        result["seconds"] = turns.seconds[name]
        result["pairs_per_second"] = len(train_records) * args.epochs / turns.seconds[name]
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="training pairs")
    parser.add_argument("--eval-pairs", type=int, default=400, help="held-out pairs for accuracy")
    parser.add_argument("--max-words", type=int, default=48, help="longest response, in words")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8, help="head size = hidden / heads")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each trainer, alternating who starts")
    parser.add_argument("--switch-every", type=int, default=5, help="optimizer steps per turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-group-by-length", action="store_true",
                        help="give TRL length-grouped sampling too (its non-default)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "score_training.json"))
    args = parser.parse_args(argv)

    records = synthetic_records(args.pairs + args.eval_pairs, args.seed, args.max_words)
    train_records, eval_records = records[: args.pairs], records[args.pairs :]
    runs: dict[str, list[dict]] = {"beaver": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = [" ".join(FILLER + GOOD + BAD)]
        model_dir = build_tiny_llama(Path(tmp) / "base", corpus, seed=args.seed, hidden_size=args.hidden,
                                     num_layers=args.layers, num_heads=args.heads)
        warm_up(model_dir, train_records, args)
        for r in range(args.rounds):
            first = "beaver" if r % 2 == 0 else "trl"
            for name, result in run_pair(args, model_dir, train_records, eval_records, Path(tmp) / f"round{r}",
                                         first).items():
                runs[name].append(result)
                print(f"round {r + 1} {name:6s} {result['pairs_per_second']:7.2f} pairs/s  {result['seconds']:7.1f} s  "
                      f"{result['steps']} steps  eval accuracy {result['accuracy']:.4f}", flush=True)

    summary = {name: {"pairs_per_second": statistics.median(x["pairs_per_second"] for x in rs),
                      "accuracy": statistics.mean(x["accuracy"] for x in rs)} for name, rs in runs.items()}
    ratio = summary["beaver"]["pairs_per_second"] / summary["trl"]["pairs_per_second"]
    accuracy_gap = summary["beaver"]["accuracy"] - summary["trl"]["accuracy"]
    result = {
        "benchmark": "reward model training: Beaver vs TRL RewardTrainer",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": f"Llama {args.layers} layers, hidden {args.hidden}, head size {args.hidden // args.heads}",
        "machine": {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_average_1_5_15min_at_end": os.getloadavg(),  # other work on a shared machine
                    "torch": torch.__version__, "trl": __import__("trl").__version__,
                    "transformers": __import__("transformers").__version__},
        "runs": runs,
        "summary": {**summary, "ratio": ratio, "accuracy_gap_points": 100 * accuracy_gap},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"beaver {summary['beaver']['pairs_per_second']:.2f} pairs/s (accuracy {summary['beaver']['accuracy']:.4f}), "
          f"trl {summary['trl']['pairs_per_second']:.2f} pairs/s (accuracy {summary['trl']['accuracy']:.4f}), "
          f"accuracy gap {100 * accuracy_gap:+.1f} points, Beaver/TRL {ratio:.2f}x")
    return result


if __name__ == "__main__":
    main()
