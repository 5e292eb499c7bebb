"""Sequence parallelism for `TensorParallel(sequence_parallel=True)`: torchtitan's layout.

Between the TP regions the residual stream is sharded on the sequence dim over tp (each rank
holds `S / T` positions of every row), so norms and residual adds run on a T-th of the tokens and
activations there cost a T-th of the memory. Where a region needs whole sequences, its input is
all-gathered and its output reduce-scattered back (row-wise linears with `Shard(1)` outputs):

- attention and dense MLPs: input all-gathered, `o_proj` / `down_proj` reduce-scatter;
- MoE blocks: input all-gathered, so the router and experts see every token of the rank's
  sequences exactly once (each tp rank runs the same routing; no token is routed twice or lost),
  output sliced back to this rank's positions (no communication; its backward all-gathers);
- norms (`input_layernorm`, `post_attention_layernorm`, the final norm): tp-replicated DTensor
  weights on sequence-sharded inputs, so their gradients are summed over tp by DTensor;
- the embedding reduce-scatters its lookup (or, tied, slices it); the lm head all-gathers its
  input and returns full-vocabulary logits.

Everything between modules is a plain local tensor (`use_local_output=True`), so model code runs
unchanged. moetx's own models only: Hugging Face builds its attention mask from the local
sequence length, and MTP heads mix token embeddings with hidden states position by position.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    SequenceParallel,
    parallelize_module,
)

from moetx.core.errors import SequenceDivisibilityError
from moetx.structure.discovery import ModelStructure
from moetx.structure.hf import hf_model_type

__all__ = ["NORM_NAMES", "install_sequence_parallel", "sequence_parallel_problems"]

NORM_NAMES = ("input_layernorm", "post_attention_layernorm")
"""Block norms that run on the sequence-sharded residual stream."""

_GATHER = PrepareModuleInput(
    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
)


def sequence_parallel_problems(model: nn.Module, s: ModelStructure) -> list[str]:
    """Why `sequence_parallel=True` cannot apply to `model` (empty: it can)."""
    problems = []
    model_type = hf_model_type(model)
    if model_type is not None:
        problems.append(
            f"sequence_parallel=True supports moetx's models; this Hugging Face `{model_type}` "
            "model builds its attention mask from the local (sharded) sequence length"
        )
    if any(b.is_mtp for b in s.blocks):
        problems.append(
            "sequence_parallel=True does not support MTP heads (they mix embeddings and hidden "
            "states position by position)"
        )
    missing = [
        f"{b.fqn}.{n}" for b in s.blocks for n in NORM_NAMES if getattr(b.module, n, None) is None
    ]
    if missing or s.final_norm is None:
        problems.append(f"sequence_parallel=True needs every block's {NORM_NAMES} and a final norm")
    return problems


def install_sequence_parallel(model: nn.Module, s: ModelStructure, tp_mesh: DeviceMesh) -> None:
    """Shard the residual stream on the sequence over `tp_mesh` (see the module docstring).

    Runs after the attention and MLP targets got their column/row-wise plans; here only the
    region boundaries are added.
    """
    degree = tp_mesh.size()
    for block in s.blocks:
        for name in NORM_NAMES:
            norm = block.module.get_submodule(name)
            parallelize_module(norm, tp_mesh, SequenceParallel(use_local_output=True))
        parallelize_module(
            block.attention,
            tp_mesh,
            PrepareModuleInput(
                input_layouts=(Shard(1), None),
                desired_input_layouts=(Replicate(), None),
                use_local_output=True,
            ),
        )
        mlp = block.module.get_submodule("mlp")
        if block.moe is not None:
            parallelize_module(
                mlp,
                tp_mesh,
                PrepareModuleInputOutput(
                    input_layouts=(Shard(1),),
                    desired_input_layouts=(Replicate(),),
                    use_local_input=True,
                    output_layouts=(Replicate(), None),
                    desired_output_layouts=(Shard(1), None),  # type: ignore[arg-type]
                    use_local_output=True,
                ),
            )
        else:
            parallelize_module(mlp, tp_mesh, _GATHER)
    assert s.final_norm is not None
    parallelize_module(s.final_norm, tp_mesh, SequenceParallel(use_local_output=True))
    if s.tied_embeddings:  # both stay replicated: slice the lookup, gather the head's input
        parallelize_module(
            s.embedding,
            tp_mesh,
            PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
        )
        assert s.lm_head is not None
        parallelize_module(s.lm_head, tp_mesh, _GATHER)
    model.register_forward_pre_hook(_SequenceCheck(degree), with_kwargs=True)


class _SequenceCheck:
    """Root pre-hook: the (local) sequence length must split evenly over tp."""

    def __init__(self, degree: int) -> None:
        self.degree = degree

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:  # type: ignore[type-arg]
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.shape[-1] % self.degree:
            raise SequenceDivisibilityError(
                f"The sequence length of `input_ids` ({ids.shape[-1]}) must be divisible by tp "
                f"({self.degree}): `TensorParallel(sequence_parallel=True)` gives each tp rank "
                "an equal part of every sequence.\n"
                f"  fix: pad or trim the sequences to a multiple of {self.degree}."
            )
