"""The README's training loop runs as written on 4 gloo ranks and trains like one process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moetx.testing import compare
from tests.bodies import readme as bodies

transformers = pytest.importorskip("transformers")

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SOURCE = next(
    b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "def main(checkpoint_dir" in b
)


def _reference(steps: int = 3, micro_batches: int = 2, rows: int = 4, seq: int = 16) -> dict:
    """One process, whole batches, HF's own shifted loss and torch's clipping: what the README
    example must reproduce."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        total = 0.0
        for _ in range(micro_batches):
            ids = torch.randint(0, config.vocab_size, (rows, seq), generator=data)
            loss = model(ids, labels=ids).loss / micro_batches
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return {"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}}


def test_the_readme_training_loop_matches_one_process(pool4, tmp_path):
    """`cp | ep | ac | fsdp` on a Qwen3-MoE, accumulation, clipping, checkpoint: the README's
    per-step losses and final parameters equal one process's on the same batches."""
    results = pool4.run(bodies.run_example, SOURCE, str(tmp_path / "ckpt"))
    ref = _reference()
    for r, res in enumerate(results):
        compare({"losses": torch.tensor(ref["losses"])}, {"losses": torch.tensor(res["losses"])},
                atol=2e-5, rtol=1e-4, what=f"rank {r} losses")  # fmt: skip
        compare(ref["params"], res["params"], atol=2e-5, rtol=1e-4, what=f"rank {r} params")
    assert (tmp_path / "ckpt" / ".metadata").exists()
