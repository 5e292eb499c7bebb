"""Stateful property: applying passes one by one, in any order, keeps the model's record sound.

A hypothesis state machine applies drawn passes to one model on a real (size-1, fake-backend)
mesh. Whatever order it tries, the model's record only ever grows in the legal stage order;
every refused step raises a typed error and leaves the record (and parameters) as they were.
"""

from __future__ import annotations

import torch
from hypothesis import note, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from torch.distributed.tensor import DTensor

import moetx
from moetx.core.order import BUILTIN_ORDER
from moetx.models import MoEConfig, MoETransformer
from moetx.testing import examples, fake_world
from moetx.testing.strategies import passes


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class OneByOne(RuleBasedStateMachine):
    """Apply passes one at a time to one model, as a user in a notebook would."""

    def __init__(self) -> None:
        super().__init__()
        self._world = fake_world(1)
        self._world.__enter__()
        self.mesh = moetx.ParallelMesh.build()
        self.model = MoETransformer(MoEConfig(num_layers=2))
        self.expected: list[moetx.Pass] = []

    @rule(p=passes())
    def apply(self, p: moetx.Pass) -> None:
        """Apply `p`; it is accepted exactly when its stage is new and comes after all applied."""
        stages = [q.placement.stage for q in self.expected]
        stage = p.placement.stage
        legal = stage not in stages and all(
            BUILTIN_ORDER.index(s) < BUILTIN_ORDER.index(stage) for s in stages
        )
        before = {k: _local(v).clone() for k, v in self.model.state_dict().items()}
        note(f"apply {p!r} after {stages} (legal: {legal})")
        if legal:
            self.model = p.apply(self.model, self.mesh)
            self.expected.append(p)
            return
        error = moetx.PassAlreadyAppliedError if stage in stages else moetx.PipelineOrderError
        try:
            p.apply(self.model, self.mesh)
        except error:
            pass
        else:
            raise AssertionError(f"{p!r} was accepted after {stages}")
        after = self.model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(before[k], _local(after[k])) for k in before)

    @invariant()
    def record_is_what_was_accepted(self) -> None:
        """The record lists exactly the accepted passes, in order."""
        assert [a.pass_ for a in moetx.applied_passes(self.model)] == self.expected

    def teardown(self) -> None:
        self._world.__exit__(None, None, None)


OneByOne.TestCase.settings = settings(
    max_examples=examples(50), stateful_step_count=6, deadline=None
)
test_one_by_one = OneByOne.TestCase
