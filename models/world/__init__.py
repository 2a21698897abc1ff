"""The synthetic alignment world of issue 6 (objects, prompts, oracle, simulated annotators).

Everything lives in ``core.py``; its data in ``world.json``. Import from here:
``from models.world import sample_prompts, annotate, evaluate_responses``.
"""

from models.world.core import (
    PROMPT_TEMPLATE_WORDS,
    SPLITS,
    WORLD_PATH,
    World,
    WorldObject,
    all_prompts,
    annotate,
    compliance,
    evaluate_responses,
    format_compliance,
    harm_categories_of,
    harmful_steps,
    helpfulness,
    is_harmful,
    is_refusal,
    load_world,
    parse_prompt,
    partial_compliance,
    prompt_parts,
    refusal,
    sample_prompts,
    sft_corpus,
    split_of,
    shuffled_compliance,
    steps_in_order,
    tokenizer_corpus,
    wrong_compliance,
)

__all__ = [
    "PROMPT_TEMPLATE_WORDS", "SPLITS", "WORLD_PATH", "World", "WorldObject", "all_prompts", "annotate",
    "compliance", "evaluate_responses", "format_compliance", "harm_categories_of", "harmful_steps", "helpfulness", "is_harmful",
    "is_refusal", "load_world", "parse_prompt", "partial_compliance", "prompt_parts", "refusal", "sample_prompts",
    "sft_corpus", "shuffled_compliance", "split_of", "steps_in_order", "tokenizer_corpus", "wrong_compliance",
]
