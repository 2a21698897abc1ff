"""PKU-SafeRLHF preference records → training pairs for the reward and cost models.

One record holds two responses to a prompt with two decoupled judgements (Safe RLHF §3.1):
``better_response_id`` (helpfulness) and ``safer_response_id`` (harmlessness), plus a safety
label per response. The reward model learns from (better, worse); the cost model from
(safer, unsafer) *and* the two safety labels. Both become a ``PreferencePair`` whose ``better``
is the preferred response of the preference at hand.

A cost model of some harm categories only (a ``cost`` job's ``harm_categories``) relabels each
response by those categories and keeps a pair's order only where it concerns them (``unsafe_for``,
``preference_pairs``).

Batches put both responses of every pair into ONE forward pass (concatenated along the batch,
better first), and are grouped by length so little compute goes to padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from models.records import check_records, harm_categories
from models.chat_format import AnswerTooLong, ChatFormat
from models.training import pad_right


@dataclass
class PreferencePair:
    prompt: str | list  # a user message, or a conversation ending with a user turn
    better: str  # reward: the more helpful response; cost: the safer one
    worse: str  # reward: the less helpful response; cost: the unsafer one
    better_is_safe: bool
    worse_is_safe: bool
    categories: tuple[str, ...] = ()  # harm categories flagged on either response, if given
    ranked: bool = True  # cost: the pair's order is learned (False: only each response's safety sign)


@dataclass
class TokenizedPair:
    better_ids: list[int]  # the chat template's [user, assistant: better], cut to max_length (answer kept)
    worse_ids: list[int]
    better_is_safe: bool
    worse_is_safe: bool
    ranked: bool = True

    @property
    def length(self) -> int:
        """Padded length this pair needs in a batch (both responses share one tensor)."""
        return max(len(self.better_ids), len(self.worse_ids))


def unsafe_for(record: dict, i: int, categories: Sequence[str] | None) -> bool:
    """Whether response ``i`` of ``record`` is unsafe for a cost model of ``categories`` (None: of all harm).

    Unsafe when labelled unsafe *and* flagged in one of the categories. A response labelled unsafe with
    no category flagged at all counts as unsafe in every category: PKU-SafeRLHF leaves some unsafe
    responses unflagged, and an annotator's "unsafe" is not to be dropped on a missing reason — a
    category model then errs towards caution, as the all-harm model does on the same response.
    """
    if record[f"is_response_{i}_safe"]:
        return False
    flagged = harm_categories(record.get(f"response_{i}_harm_category"))
    return categories is None or not flagged or bool(set(flagged) & set(categories))


def preference_pairs(records: Sequence[dict], score_type: str,
                     categories: Sequence[str] | None = None) -> list[PreferencePair]:
    """Validated pairs of ``score_type`` ("reward" | "cost").

    ``categories`` (cost only) trains a cost model of those harm categories: each response's safety
    label is ``unsafe_for`` them, and a pair keeps its ranking term (``ranked``) only when its unsafer
    response is unsafe in them. A pair whose safer label concerns other categories (or none: two safe
    answers) says nothing about these — and when the *safer* response is the one unsafe in them, its
    order would even teach the opposite — so only its two sign terms are learned.
    Raises ``models.records.InvalidRecords`` naming every malformed or contradictory record
    (the safer response labelled unsafe while the other is labelled safe).
    """
    if score_type not in ("reward", "cost"):
        raise ValueError(f"score_type must be 'reward' or 'cost', got {score_type!r}")
    if categories is not None and score_type != "cost":
        raise ValueError("harm categories select what a cost model learns; a reward model has none")
    check_records("preference", list(records))
    key = "better_response_id" if score_type == "reward" else "safer_response_id"
    pairs = []
    for r in records:
        b = r[key]
        if b is None:  # a tie: this preference has no order to learn
            continue
        w = 1 - b
        flagged = sorted(set(harm_categories(r.get("response_0_harm_category")))
                         | set(harm_categories(r.get("response_1_harm_category"))))
        if categories is None:
            safe = (r[f"is_response_{b}_safe"], r[f"is_response_{w}_safe"])
            ranked = True
        else:
            safe = (not unsafe_for(r, b, categories), not unsafe_for(r, w, categories))
            ranked = not safe[1]
        pairs.append(PreferencePair(prompt=r["prompt"], better=r[f"response_{b}"], worse=r[f"response_{w}"],
                                    better_is_safe=safe[0], worse_is_safe=safe[1], categories=tuple(flagged),
                                    ranked=ranked))
    return pairs


def category_counts(records: Sequence[dict], categories: Sequence[str]) -> dict[str, int]:
    """What each of a cost model's ``categories`` contributed, over the cost pairs of ``records`` (ties
    left out): ``data/category/<name>/unsafe_responses`` (responses labelled unsafe and flagged in it),
    ``data/category/<name>/ranked_pairs`` (pairs ranked because their unsafer response is flagged in
    it); and ``data/unsafe_uncategorised`` (unsafe, flagged in no category: unsafe for every model),
    ``data/ranked_pairs`` / ``data/sign_only_pairs``."""
    counts = {f"data/category/{c}/{k}": 0 for c in categories for k in ("unsafe_responses", "ranked_pairs")}
    counts |= {"data/unsafe_uncategorised": 0, "data/ranked_pairs": 0, "data/sign_only_pairs": 0}
    for r in records:
        b = r["safer_response_id"]
        if b is None:
            continue
        for i in (0, 1):
            flagged = set(harm_categories(r.get(f"response_{i}_harm_category")))
            if r[f"is_response_{i}_safe"]:
                continue
            if not flagged:
                counts["data/unsafe_uncategorised"] += 1
            for c in flagged & set(categories):
                counts[f"data/category/{c}/unsafe_responses"] += 1
                if i == 1 - b:
                    counts[f"data/category/{c}/ranked_pairs"] += 1
        counts["data/ranked_pairs" if unsafe_for(r, 1 - b, categories) else "data/sign_only_pairs"] += 1
    return counts


def tokenize_pairs(fmt: ChatFormat, pairs: Sequence[PreferencePair], max_length: int | None = None) -> list[TokenizedPair]:
    """Token ids of both conversations of every pair, as ``/v1/score`` and PPO read them (a long
    prompt cut from the left, the answer whole; ``AnswerTooLong`` when an answer does not fit)."""
    return [TokenizedPair(fmt.completion_ids(p.prompt, p.better, max_length),
                          fmt.completion_ids(p.prompt, p.worse, max_length), p.better_is_safe, p.worse_is_safe,
                          p.ranked)
            for p in pairs]


def fitting_pairs(fmt: ChatFormat, pairs: Sequence[PreferencePair], max_length: int | None
                  ) -> tuple[list[PreferencePair], list[TokenizedPair]]:
    """The pairs whose two answers fit ``max_length`` (``tokenize_pairs``), with their token ids;
    the others are left out (the caller counts them)."""
    kept, tokens = [], []
    for pair in pairs:
        try:
            tokens.extend(tokenize_pairs(fmt, [pair], max_length))
        except AnswerTooLong:
            continue
        kept.append(pair)
    return kept, tokens


def collate_pairs(batch: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One tensor for both halves of B pairs: rows ``0..B-1`` are the better responses, rows
    ``B..2B-1`` the worse ones, so one forward gives both scores (``scores.chunk(2)``).

    Returns ``input_ids`` and ``attention_mask`` (2B, T) right-padded to the batch's longest
    sequence, and ``better_is_safe`` / ``worse_is_safe`` / ``ranked`` (B,) bool.
    """
    input_ids, attention_mask = pad_right([p.better_ids for p in batch] + [p.worse_ids for p in batch], pad_token_id)
    return {
        "input_ids": input_ids,  # (2B, T)
        "attention_mask": attention_mask,  # (2B, T)
        "better_is_safe": torch.tensor([p.better_is_safe for p in batch], dtype=torch.bool),  # (B,)
        "worse_is_safe": torch.tensor([p.worse_is_safe for p in batch], dtype=torch.bool),  # (B,)
        "ranked": torch.tensor([p.ranked for p in batch], dtype=torch.bool),  # (B,)
    }


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           group_batches: int = 50) -> list[list[int]]:
    """Indices in batches of similar length, different for every ``seed``.

    Shuffle, cut into groups of ``group_batches`` batches, sort each group by length and split it
    into batches, then shuffle the batches: nearly as little padding as a full sort, while every
    batch is still a random draw of pairs of its length (as HF's ``LengthGroupedSampler``).
    The longest batch goes first, so an out-of-memory shows up at step 1, not after an hour.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda k: max(lengths[i] for i in batches[k]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches
