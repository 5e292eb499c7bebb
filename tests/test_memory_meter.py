"""`LiveActivationMeter`: what it counts, what it leaves out, and that it is deterministic."""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from moetx.planning.meter import LiveActivationMeter
from moetx.testing import fake_world
from tests.bodies.meter import keep_chunks, read_while_work_held

F32 = 4


@pytest.fixture(autouse=True)
def _young_heap() -> Iterator[None]:
    """The meter collects garbage before each read; late in a full run the heap holds what
    earlier tests left (models, hypothesis' caches) and one collection took seconds. Objects
    older than the test are frozen out of the collector's scan (what `trace_blocks` does):
    what the test makes is collected as before."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def test_counts_what_backward_keeps():
    """`sin` saves its input: that intermediate is counted, the excluded leaf is not."""
    x = torch.randn(16, 4, requires_grad=True)
    with LiveActivationMeter(exclude=[x]) as live:
        y = (x * 2).sin()
    assert live.live_bytes(exclude=[y]) == 16 * 4 * F32
    assert live.live_bytes() == 2 * 16 * 4 * F32
    del y
    assert live.live_bytes() == 0  # the graph died with y


def test_freed_temporaries_do_not_count():
    """Outputs that died before `live_bytes` (no-grad temporaries) count zero."""
    x = torch.randn(32, 8)
    with torch.no_grad(), LiveActivationMeter(exclude=[x]) as live:
        total = (x * 2).exp().sum()
    assert live.live_bytes(exclude=[total]) == 0


def test_views_share_one_storage():
    """Several views of one tensor count its storage once."""
    x = torch.randn(10, 10)
    with LiveActivationMeter(exclude=[x]) as live:
        a = x + 1
        views = [a[1:], a.view(100), a.t()]
    assert live.live_bytes() == 100 * F32
    assert len(live.live_storages()) == 1
    del a
    assert live.live_bytes() == 100 * F32  # the views keep the storage alive
    del views


def test_module_parameters_buffers_and_their_views_are_excluded():
    """Excluding a module excludes its parameters, buffers, and views of them."""
    bn = nn.BatchNorm1d(4)
    x = torch.randn(8, 4)
    with torch.no_grad(), LiveActivationMeter(exclude=[bn, x]) as live:
        w = bn.weight.t()
        assert bn.running_mean is not None
        running = bn.running_mean.view(2, 2)
        bn(x)  # updates the running stats in place (outputs alias the buffers)
    assert live.live_bytes() == 0
    assert w.shape == (4,) and running.shape == (2, 2)


def test_sees_checkpoint_inputs_and_selective_caches():
    """Non-reentrant checkpointing keeps its inputs; selective checkpointing keeps what its
    cache saves (invisible to saved-tensor hooks); both are counted."""
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64, requires_grad=True)

    def block(h: torch.Tensor) -> torch.Tensor:
        return (h @ w).relu() @ w

    def measure(**kwargs: object) -> int:
        with LiveActivationMeter(exclude=[w, x]) as live:
            h = x * 1.0
            out = checkpoint(block, h, use_reentrant=False, **kwargs)  # type: ignore[arg-type]
        return live.live_bytes(exclude=[out])

    row_bytes = 32 * 64 * F32
    assert measure() == row_bytes  # only the checkpoint's input h
    save_mm = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    assert measure(context_fn=save_mm) == 2 * row_bytes  # h and the first mm (the 2nd is out)


def test_repeatable():
    """The same forward measures the same bytes every time."""
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(8, 16)

    def measure() -> int:
        with LiveActivationMeter(exclude=[model, x]) as live:
            out = model(x)
        return live.live_bytes(exclude=[out])

    first = measure()
    assert first == 2 * 8 * 64 * F32  # the GELU input and the second Linear's input
    assert [measure() for _ in range(3)] == [first] * 3


def test_looks_through_dtensors():
    """Outputs that are DTensors count the storage of their local tensors."""
    with fake_world(1):
        mesh = init_device_mesh("cpu", (1,))
        x = distribute_tensor(torch.randn(8, 8), mesh, [Replicate()])
        with LiveActivationMeter(exclude=[x]) as live:
            y = x * 2
        assert live.live_bytes() == 8 * 8 * F32
        assert live.live_bytes(exclude=[y]) == 0


def test_exclude_rejects_other_values():
    """`exclude` takes tensors and modules only."""
    with pytest.raises(
        TypeError, match=r"^`exclude` holds tensors and modules only \(got `int`\)\.$"
    ):
        LiveActivationMeter(exclude=[3])  # type: ignore[list-item]


def test_a_collective_keeping_views_of_its_buffer_holds_the_reading():
    """gloo's all-gather Work keeps per-rank chunk views of the output buffer it was given and
    destroys them after its other tensors, with the GIL released. The meter gave c10d a view of
    the program's buffer, so the chunks held the program's tensor, not the meter's: a reading
    woken in between counted the dropped output (the CI failure of
    `test_buffers_a_collective_still_holds_do_not_count[c10d]`: 32 bytes). A stand-in c10d op
    keeps such chunks for 0.5 s: the reading waits for them and counts nothing."""
    with LiveActivationMeter(release_timeout=30.0) as meter:
        out = torch.zeros(8) + 1  # an op output the collective writes into
        keep_chunks(out, 0.5)
    del out
    start = time.monotonic()
    assert meter.live_bytes() == 0
    assert time.monotonic() - start >= 0.4  # it waited for the chunks to go


# --------------------------------------------------------------- collectives (2 gloo ranks)


@pytest.mark.parametrize("kind", ["c10d", "functional"])
def test_buffers_a_collective_still_holds_do_not_count(pool2, kind: str):
    """A collective's Work holds its input and output until it is destroyed, and gloo's worker
    thread destroys a finished one only after waking the waiter: read in that moment, the
    dropped buffers of the forward's last collective counted as activations (the intermittent
    `test_tp_predictions_equal_real_ranks` failure: the logits all-gather's 1088 + 2176 bytes).
    Provoked here by another thread holding the Work for 1 s: the meter waits for the release
    and counts neither buffer (before, it read the 48 bytes at once)."""
    for r in pool2.run(read_while_work_held, kind, hold_s=1.0, timeout_s=30.0):
        assert r["buffers"] == 48
        assert r["bytes"] == 0, r
        assert r["seconds"] >= 0.9, r  # it waited for the release


def test_a_collective_held_past_the_timeout_is_a_typed_error(pool2):
    """A Work kept past `release_timeout` cannot be read around: `CollectiveHeldError`."""
    for r in pool2.run(read_while_work_held, "c10d", hold_s=1.5, timeout_s=0.5):
        assert r["bytes"] == (
            "`LiveActivationMeter` cannot read: a collective issued inside it is still held by "
            "c10d (after 0.5 s).\n"
            "  a c10d Work keeps its input and output tensors alive until it is destroyed; "
            "read now, they would count as activations\n"
            "  fix: wait on and drop every Work (e.g. from `async_op=True`) before reading"
        )
