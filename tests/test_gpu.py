"""GPU readiness: the parity tests of the composed pipelines, on gloo here and on NCCL with GPUs.

Each test runs one rank body (tests/bodies/gpu.py) twice: `[gloo]` on CPU ranks (always), and
`[nccl]` on one GPU per rank, which skips with `NEEDS_GPUS` unless the machine has at least two
CUDA devices. `make gpu-check` sets `MOETX_REQUIRE_GPU=1`, which turns that skip into a failure,
so a GPU check on a machine without GPUs cannot pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import torch
import torch.distributed as dist

from moetx import FSDP, ActivationCheckpoint, ContextParallel, ExpertParallel, MeshDegrees
from moetx.models import MoEConfig
from moetx.testing import BackendUnavailableError, RankPool
from moetx.testing.parity import compare
from moetx.testing.train import TrainSpec, assert_matches_reference, mean_losses
from tests.bodies import gpu as bodies
from tests.bodies.overlap import MODES, overlap_times

GPUS = torch.cuda.device_count()
RANKS = 2
NEEDS_GPUS = (
    f"needs {RANKS} CUDA devices with NCCL (one rank per GPU); this machine has {GPUS}"
    f"{'' if dist.is_nccl_available() else ' and torch has no NCCL'}"
)
REQUIRE_GPU = os.environ.get("MOETX_REQUIRE_GPU") == "1"

#: fp32 tolerances: gloo/CPU as the other parity tests; NCCL/cuBLAS sum in other orders (split-K,
#: batch-size-dependent kernels), so a little wider, still far below a 2x scale or missing term.
FP32_TOL = {"gloo": {"atol": 2e-5, "rtol": 1e-4}, "nccl": {"atol": 1e-4, "rtol": 1e-3}}
#: And per tensor in norm (`assert_norm_errors`), which an elementwise atol cannot do for the
#: small expert and router gradients: measured on gloo/CPU within 1e-6.
FP32_GRAD_REL = {"gloo": 1e-5, "nccl": 1e-4}
#: bf16 (eps 2^-8 = 3.9e-3): the loss at every step within `BF16_LOSS_TOL`; the gradients of the
#: first step (before any bf16 update) per tensor within `BF16_GRAD_REL` of the reference's norm,
#: `|a - e| / |e|`. Measured on gloo/CPU (2 ranks, this CONFIG): loss within 3.6e-4, first-step
#: gradients within 0.6% (bf16 model) / 0.6% (fp32 master, bf16 compute); after one bf16 AdamW
#: step the gradients drift apart by up to 19% (bf16 model; 6% mixed precision), so later steps
#: compare losses only. An elementwise tolerance would be useless here: expert and router
#: gradients are so small that doubling them stays within any bf16 `atol`; a norm ratio of 3%
#: fails a 2x scale, a dropped term or a wrong reduction.
BF16_LOSS_TOL = {"atol": 2e-2, "rtol": 0.0}
BF16_GRAD_REL = 0.03

# Two MoE blocks after a dense one, a shared expert and the aux loss: every kind of gradient.
CONFIG = MoEConfig(
    num_layers=3, num_dense_layers=1, num_experts=4, top_k=2, num_shared_experts=1,
    aux_loss_coef=0.01,
)  # fmt: skip
SPEC = TrainSpec(config=CONFIG, steps=2, seq_len=8)


@pytest.fixture(scope="session")
def nccl_pool() -> Iterator[RankPool]:
    """`RANKS` NCCL ranks, one GPU each; skips (fails under MOETX_REQUIRE_GPU=1) without them."""
    if GPUS < RANKS or not dist.is_nccl_available():
        if REQUIRE_GPU:
            pytest.fail(f"MOETX_REQUIRE_GPU=1 but the GPU tests cannot run: {NEEDS_GPUS}")
        pytest.skip(NEEDS_GPUS)
    with RankPool(RANKS, backend="nccl", timeout=300) as pool:
        yield pool


@pytest.fixture(params=["gloo", "nccl"])
def pool(request: pytest.FixtureRequest) -> RankPool:
    """The 2-rank gloo session pool, or the NCCL pool."""
    name = "pool2" if request.param == "gloo" else "nccl_pool"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def _run(pool: RankPool, spec: TrainSpec, pipeline: Any, degrees: MeshDegrees) -> Any:
    results = pool.run(bodies.device_train, spec, pipeline, degrees)
    want = "cpu" if pool.backend == "gloo" else "cuda:{}"
    assert [r["device"] for r in results] == [want.format(r) for r in range(RANKS)]
    return results, results[0].pop("reference")


# ----------------------------------------------------------------------------- the harness


def test_each_rank_computes_on_its_own_device(pool: RankPool) -> None:
    """gloo ranks compute on the CPU; NCCL rank r on `cuda:r`, and its collectives work there."""
    want = ["cpu"] * RANKS if pool.backend == "gloo" else [f"cuda:{r}" for r in range(RANKS)]
    assert pool.run(bodies.device_of_rank) == [f"{d} sum={RANKS}" for d in want]


@pytest.mark.skipif(GPUS >= RANKS, reason="this machine has the GPUs the refusal is about")
def test_nccl_pool_without_gpus_is_refused_before_starting() -> None:
    """An NCCL pool on a machine with too few GPUs: a typed error with the count and the fix."""
    with pytest.raises(
        BackendUnavailableError,
        match=(
            rf"^`RankPool\(2, backend='nccl'\)` needs one CUDA device per rank \(2\), but this "
            rf"machine has {GPUS} \(torch .*\)\.\n  fix: run on a machine with that many GPUs, "
            r"or use backend='gloo' \(CPU\)\.$"
        ),
    ):
        RankPool(2, backend="nccl")


def test_unknown_backend_is_refused() -> None:
    """Only gloo and nccl are known."""
    with pytest.raises(ValueError, match=r"^`backend` \('mpi'\) must be one of 'gloo', 'nccl'\.$"):
        RankPool(2, backend="mpi")


def test_gpu_skip_reason_names_what_is_missing() -> None:
    """The `[nccl]` tests' skip reason says how many GPUs they need and how many there are."""
    assert NEEDS_GPUS.startswith("needs 2 CUDA devices with NCCL (one rank per GPU); this ")
    assert f"this machine has {GPUS}" in NEEDS_GPUS


# ------------------------------------------------------------------------------ parity (fp32)


def test_ep_ac_fsdp_trains_like_one_process(pool: RankPool) -> None:
    """`ExpertParallel() | ActivationCheckpoint() | FSDP()` (dp_shard 2 = ep 2): loss, every
    gradient at every step and the final parameters match one process on one device."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    pipeline = ExpertParallel() | ActivationCheckpoint() | FSDP()
    results, ref = _run(pool, SPEC, pipeline, degrees)
    assert_matches_reference(results, ref, **FP32_TOL[pool.backend])
    assert_norm_errors(results, ref, steps=SPEC.steps, limit=FP32_GRAD_REL[pool.backend])


def test_cp_ep_ac_fsdp_trains_like_one_process(pool: RankPool) -> None:
    """`ContextParallel() | ExpertParallel() | ActivationCheckpoint() | FSDP()` (cp 2 = ep 2,
    one data rank): the same comparison; each rank holds half of every sequence."""
    degrees = MeshDegrees(dp_shard=1, cp=2, ep=2)
    pipeline = ContextParallel() | ExpertParallel() | ActivationCheckpoint() | FSDP()
    results, ref = _run(pool, SPEC, pipeline, degrees)
    assert_matches_reference(results, ref, **FP32_TOL[pool.backend])
    assert_norm_errors(results, ref, steps=SPEC.steps, limit=FP32_GRAD_REL[pool.backend])


# ---------------------------------------------------------------------------------------- bf16


def test_bf16_model_with_fp32_router_logits(pool: RankPool) -> None:
    """A bf16 model (`MoEConfig(dtype="bfloat16")`) under `EP | AC | FSDP` matches the bf16 model
    in one process within bf16 tolerances; its routers keep their bf16 weights (the config's
    dtype) and compute their logits and scores in float32, as `TopKRouter` promises."""
    spec = attrs.evolve(SPEC, config=attrs.evolve(CONFIG, dtype="bfloat16"))
    degrees = MeshDegrees(dp_shard=2, ep=2)
    pipeline = ExpertParallel() | ActivationCheckpoint() | FSDP()
    results, ref = _run(pool, spec, pipeline, degrees)
    for r in [ref, *results]:
        assert r["router"] == {
            "compute_weight": torch.bfloat16,
            "scores": torch.float32,
            "stored": torch.bfloat16,
        }
    assert all(g.dtype == torch.bfloat16 for g in results[0]["grads"][0].values())
    _assert_bf16_parity(results, ref)


def test_bf16_mixed_precision_keeps_the_router_in_fp32(pool: RankPool) -> None:
    """fp32 master weights, `FSDP(param_dtype="bfloat16", reduce_dtype="float32")` under
    `EP | AC | FSDP`: the router all-gathers and computes in fp32 (FSDP's default
    `fp32_modules`), the rest in bf16; loss and gradients match one process computing on the
    same casts (`TrainSpec.param_dtype`) within bf16 tolerances; parameters stay fp32."""
    spec = TrainSpec(config=CONFIG, steps=2, param_dtype="bfloat16")
    degrees = MeshDegrees(dp_shard=2, ep=2)
    fsdp = FSDP(param_dtype="bfloat16", reduce_dtype="float32")
    results, ref = _run(pool, spec, ExpertParallel() | ActivationCheckpoint() | fsdp, degrees)
    fp32 = {"compute_weight": torch.float32, "scores": torch.float32, "stored": torch.float32}
    assert ref["router"] == fp32
    assert all(r["router"] == fp32 for r in results)
    _assert_bf16_parity(results, ref)
    assert all(p.dtype == torch.float32 for p in results[0]["params"].values())


def _assert_bf16_parity(results: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """Losses of every step within `BF16_LOSS_TOL`; each first-step gradient of every rank
    within `BF16_GRAD_REL` of the reference's norm (see `BF16_GRAD_REL`)."""
    for step, (got, want) in enumerate(zip(mean_losses(results), ref["losses"], strict=True)):
        compare({"loss": want}, {"loss": got}, what=f"bf16 loss at step {step}", **BF16_LOSS_TOL)
    assert_norm_errors(results, ref, steps=1, limit=BF16_GRAD_REL)


def assert_norm_errors(
    results: list[dict[str, Any]], ref: dict[str, Any], *, steps: int, limit: float
) -> None:
    """Every rank's gradient of each of the first `steps` steps is within `limit` of the
    reference's in norm: `|actual - expected| / |expected| <= limit`, one table row per miss."""
    for r, res in enumerate(results):
        for step in range(steps):
            got, want = res["grads"][step], ref["grads"][step]
            assert got.keys() == want.keys()
            rel = {k: norm_error(got[k], e) for k, e in want.items()}
            compare(
                dict.fromkeys(rel, torch.tensor(0.0, dtype=torch.float64)),
                rel,
                atol=limit,
                rtol=0.0,
                what=f"rank {r} step-{step} gradients' |actual - expected| / |expected|",
            )


def norm_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """`|actual - expected| / |expected|` (Frobenius norms, float64); `|actual|` if expected is 0."""
    a, e = actual.double(), expected.double()
    scale = e.norm()
    return (a - e).norm() / scale if scale > 0 else a.norm()


# ---------------------------------------------------------------------- benchmark bodies


def test_overlap_benchmark_times_every_variant(pool: RankPool) -> None:
    """benchmarks/overlap.py's body runs each variant `reps` times on every rank, on either
    backend (`make gpu-check` runs it on NCCL)."""
    got = pool.run(overlap_times, 16, 8, 2, 16, reps=3, warmup=1, idle_s=1e-4)
    for times in got:
        assert set(times) == set(MODES)
        assert all(len(v) == 3 and all(t > 0 for t in v) for v in times.values())
    # The idle control waits at least its sleep in both orders.
    assert all(t >= 1e-4 for r in got for m in ("idle_serial", "idle_overlap") for t in r[m])
