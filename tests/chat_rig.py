"""Rig a tiny real model to write a chosen token first, so stopping can be tested on every eos id.

The final norm's gain is set so that, at the last position of one prompt, the hidden state is
``α·W_k`` (``W`` the output embedding): the logits are then ``α·W·W_k``, largest at ``k`` for random
embeddings. The weights stay a real model's, saved and loaded through ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.chat_format import ChatFormat
from models.loading import load_causal_lm


def force_first_token(model_dir, prompt, token_id: int, out_dir, alpha: float = 50.0) -> Path:
    fmt = ChatFormat.load(model_dir)
    model = load_causal_lm(model_dir, fmt.tokenizer).eval()
    norm = model.base_model.norm
    assert torch.all(norm.weight == 1), "rig a freshly initialised model (final norm gain 1)"
    ids = torch.tensor([fmt.prompt_ids(prompt)])
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]  # after the final norm
        W = model.get_output_embeddings().weight  # (V, H)
        norm.weight.copy_(alpha * W[token_id] / h)
        logits = model(input_ids=ids).logits[0, -1]
    assert int(logits.argmax()) == token_id, "the rig did not make the token the most likely"
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    fmt.save(out_dir)
    for name in ("generation_config.json",):  # keep the publisher's sampling defaults in place
        src = Path(model_dir) / name
        if src.is_file():
            import json

            shipped = json.loads(src.read_text())
            saved = json.loads((out_dir / name).read_text())
            (out_dir / name).write_text(json.dumps({**shipped, "eos_token_id": saved["eos_token_id"]}))
    return out_dir
