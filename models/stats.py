"""Dataset statistics: what the API shows for a dataset and what the ``dataset_stats`` job computes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated

from models.jobs import Bound, JobContext, JobResult
from models.records import harm_categories


@dataclass
class StatsConfig:
    """Params of the ``dataset_stats`` job."""

    percentiles: Annotated[tuple[Annotated[int, Bound(ge=0, le=100)], ...], Bound(max_length=100)] = (50, 90, 99)
    """Length percentiles to report (in words) for prompts and responses."""


def _percentiles(values: list[int], qs) -> dict:
    if not values:
        return {}
    values = sorted(values)
    return {f"p{q}": values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] for q in qs}


def summary(kind: str, records: list[dict]) -> dict:
    """Cheap statistics computed at upload time."""
    stats: dict = {"records": len(records)}
    if kind == "preference" and records:
        safe = sum(r["is_response_0_safe"] + r["is_response_1_safe"] for r in records)
        stats["safe_ratio"] = safe / (2 * len(records))
        decided = [r for r in records if r["better_response_id"] is not None and r["safer_response_id"] is not None]
        if decided:
            stats["better_is_safer"] = sum(r["better_response_id"] == r["safer_response_id"] for r in decided) / len(decided)
        if len(decided) < len(records):
            stats["ties"] = len(records) - len(decided)  # a null id: an arena tie or "both bad"
        stats["both_unsafe"] = sum(not r["is_response_0_safe"] and not r["is_response_1_safe"] for r in records)
        categories = Counter(c for r in records for i in (0, 1) for c in harm_categories(r.get(f"response_{i}_harm_category")))
        if categories:
            stats["harm_categories"] = dict(categories.most_common())
    if kind == "prompt" and records:
        stats["red_team_ratio"] = sum(bool(r.get("red_team")) for r in records) / len(records)
    return stats


def add_to_summary(kind: str, stats: dict, records: list[dict]) -> dict:
    """``summary`` of the old records plus ``records``, from the old summary alone: appending a vote
    to a dataset of 100k must not read the 100k back. Ratios are turned back into counts (exact:
    they are counts over a known denominator) and merged with the new records' counts."""
    new = summary(kind, records)
    n, m = stats.get("records", 0), new["records"]
    merged: dict = {"records": n + m}

    def ratio(key: str, old_denominator: int, new_denominator: int) -> None:
        count = round(stats.get(key, 0.0) * old_denominator) + round(new.get(key, 0.0) * new_denominator)
        if old_denominator + new_denominator:
            merged[key] = count / (old_denominator + new_denominator)

    if kind == "preference":
        ratio("safe_ratio", 2 * n, 2 * m)
        ratio("better_is_safer", n - stats.get("ties", 0), m - new.get("ties", 0))
        for key in ("both_unsafe", "ties"):
            if stats.get(key, 0) + new.get(key, 0) or key == "both_unsafe":
                merged[key] = stats.get(key, 0) + new.get(key, 0)
        categories = Counter(stats.get("harm_categories", {})) + Counter(new.get("harm_categories", {}))
        if categories:
            merged["harm_categories"] = dict(categories.most_common())
    elif kind == "prompt":
        ratio("red_team_ratio", n, m)
    return merged


def dataset_stats(kind: str, records: list[dict], percentiles=(50, 90, 99)) -> dict:
    """``summary`` plus length percentiles (words) of prompts and responses."""
    stats = summary(kind, records)
    prompts, responses = [], []
    for r in records:
        if "messages" in r:
            prompts.append(sum(len(m["content"].split()) for m in r["messages"][:-1]))
            responses.append(len(r["messages"][-1]["content"].split()))
            continue
        prompt = r["prompt"]
        prompts.append(len(prompt.split()) if isinstance(prompt, str) else sum(len(m["content"].split()) for m in prompt))
        for key in ("response", "response_0", "response_1"):
            if key in r:
                responses.append(len(r[key].split()))
    stats["prompt_length"] = _percentiles(prompts, percentiles)
    if responses:
        stats["response_length"] = _percentiles(responses, percentiles)
    return stats


def run(config: StatsConfig, ctx: JobContext) -> JobResult:
    """Job entry point: statistics of each dataset in ``ctx.datasets``."""
    from models.records import KINDS

    metrics = {}
    for step, dataset_id in enumerate(ctx.datasets, start=1):
        ctx.check_cancel()
        records = ctx.load_dataset(dataset_id)
        kind = _guess_kind(records)
        assert kind in KINDS
        metrics[dataset_id] = dataset_stats(kind, records, config.percentiles)
        ctx.report({"step": step, "total_steps": len(ctx.datasets), "message": f"{dataset_id}: {len(records)} records",
                    "stats/records": len(records)})
    return JobResult(metrics=metrics)


def _guess_kind(records: list[dict]) -> str:
    if records and "response_0" in records[0]:
        return "preference"
    if records and ("response" in records[0] or "messages" in records[0]):
        return "sft"
    return "prompt"
