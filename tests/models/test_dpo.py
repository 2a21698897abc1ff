"""DPO: exact loss values, then a few steps on a tiny Llama widen the preferred response's margin."""

import math

import pytest
import torch

from models.chat_format import ChatFormat
from models.dpo import DPOConfig, evaluate_margin, run
from models.jobs import JobContext
from models.loading import load_causal_lm
from models.losses import dpo_loss
from models.training import OptimConfig


def test_dpo_loss_exact():
    loss, margins = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]),
                             torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    # margins: 0.5·[(−1+2) − (−3+2)] = 1, 0.5·[0 − 1] = −0.5
    torch.testing.assert_close(margins, torch.tensor([1.0, -0.5]))
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def preference(prompt, better, worse, better_id):
    responses = [better, worse] if better_id == 0 else [worse, better]
    return {"prompt": prompt, "response_0": responses[0], "response_1": responses[1],
            "is_response_0_safe": True, "is_response_1_safe": True,
            "better_response_id": better_id, "safer_response_id": 0}


RECORDS = [
    preference(f"how do i make a {w} ?", f"sure . step 1 : mix {w} . step 2 : bake it .",
               "sorry , i can not help with that .", i % 2)
    for i, w in enumerate(["cake", "red", "blue", "green", "dog", "fox", "one", "two"])
]


def test_dpo_raises_the_preferred_responses_margin(tiny_llama_dir, tmp_path):
    fmt = ChatFormat.load(tiny_llama_dir)
    reference = load_causal_lm(tiny_llama_dir, fmt.tokenizer)
    assert evaluate_margin(reference, reference, fmt, RECORDS) == 0.0
    events = []
    ctx = JobContext(output_dir=tmp_path, datasets=["prefs"], load_dataset=lambda d: RECORDS, report=events.append)
    config = DPOConfig(model=str(tiny_llama_dir), beta=0.1, optim=OptimConfig(lr=1e-3, weight_decay=0.05), epochs=3,
                       batch_size=4, seed=0)
    result = run(config, ctx)
    policy = load_causal_lm(result.artifacts[0].path, fmt.tokenizer)
    assert evaluate_margin(policy, reference, fmt, RECORDS) > 1.0
    assert events[-1]["train/loss"] < events[0]["train/loss"]
    assert events[-1]["train/reward_accuracy"] == 1.0


def test_dpo_reads_whole_answers_of_long_prompts_and_counts_the_pairs_it_leaves_out(tiny_llama_dir):
    """A long prompt loses its first tokens, never the answer's: both answers' labels are whole; a
    pair whose answer does not fit even so is left out and counted."""
    from models.dpo import tokenize_dpo_pairs
    from models.training import IGNORE

    fmt = ChatFormat.load(tiny_llama_dir)
    long = preference("how do i make a cake ? " * 10, "sure . step 1 : mix flour .", "sorry , i can not help .", 0)
    too_long = preference("hi", "sure . " * 30, "no .", 1)
    pairs, left_out = tokenize_dpo_pairs(fmt, [long, too_long], max_length=24)
    assert left_out == 1 and len(pairs) == 1
    for (ids, labels), answer in zip(pairs[0], ("sure . step 1 : mix flour .", "sorry , i can not help .")):
        assert len(ids) == 24
        assert fmt.tokenizer.decode([t for t in labels if t != IGNORE], skip_special_tokens=True).strip() == answer
    with pytest.raises(ValueError, match="every one of the 1 preference pairs"):
        run(DPOConfig(model=str(tiny_llama_dir), max_length=24, epochs=1, batch_size=2),
            JobContext(output_dir="/nonexistent", datasets=["d"], load_dataset=lambda d: [too_long]))
