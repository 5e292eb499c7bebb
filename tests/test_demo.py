"""`moetx demo`: the README's first command runs end to end and teaches on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moetx.cli.demo import main, parse_pipeline


def test_demo_trains_with_parity_end_to_end():
    """The default demo (EP | AC | FSDP on 2 spawned CPU ranks) prints a parity table and passes."""
    proc = subprocess.run(
        [sys.executable, "-m", "moetx", "demo", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "pipeline: ExpertParallel() | ActivationCheckpoint() | FSDP()" in out
    assert "PipelineOrderError: `FSDP` must come after `ExpertParallel`." in out
    assert "step | reference loss | moetx loss | max |Δ grad|" in out
    assert "PARITY OK" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--pipeline", "fsdp|ep"],
            r"PipelineOrderError: `FSDP` must come after `ExpertParallel`\.",
        ),
        (["--pipeline", "ep|sp"], r"ValueError: `--pipeline` names an unknown pass \('sp'\)"),
        (["--ranks", "4", "--ep", "3"], r"MeshError: `ep` \(3\) must divide `dp_shard × cp`"),
    ],
)
def test_bad_flags_give_the_library_error_not_a_traceback(capsys, argv, message):
    """A wrong order, an unknown pass or a bad mesh exits 2 with moetx's teaching message."""
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_parse_pipeline_builds_the_named_passes():
    """`cp|ep|ac|fsdp` maps to the four passes with the chosen options, in order."""
    pipe = parse_pipeline("cp|ep|ac|fsdp", dispatcher="all_gather", ac_mode="full")
    assert repr(pipe) == (
        "ContextParallel() | ExpertParallel(dispatcher='all_gather') | "
        "ActivationCheckpoint(mode='full') | FSDP()"
    )


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def test_demo_runs_under_torchrun():
    """The torchrun path (the GPU path's launcher; gloo here) trains with parity on 2 ranks."""
    proc = subprocess.run(
        [*TORCHRUN, "-m", "moetx", "demo", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("PARITY OK") == 1, proc.stdout  # rank 0 reports, once
