"""`moetx demo` and `moetx plan` refuse out-of-range arguments with one teaching error (issue 13)."""

from __future__ import annotations

import re

import pytest

from moetx.cli import demo, plan

DEMO_BAD = [
    (["--steps", "-1"], r"`--steps` \(-1\) must be an integer >= 1\."),
    (["--steps", "0"], r"`--steps` \(0\) must be an integer >= 1\."),
    (["--ranks", "0"], r"`--ranks` \(0\) must be an integer >= 1\."),
    (["--layers", "0"], r"`--layers` \(0\) must be an integer >= 1\."),
    (["--experts", "0"], r"`--experts` \(0\) must be an integer >= 1\."),
    (["--ep", "0"], r"`--ep` \(0\) must be an integer >= 1\."),
    (["--cp", "-2"], r"`--cp` \(-2\) must be an integer >= 1\."),
    (["--dp-replicate", "0"], r"`--dp-replicate` \(0\) must be an integer >= 1\."),
]
PLAN_BAD = [
    (["--world", "0"], r"`--world` \(0\) must be an integer >= 1\."),
    (["--ep", "0"], r"`--ep` \(0\) must be an integer >= 1\."),
    (["--cp", "0"], r"`--cp` \(0\) must be an integer >= 1\."),
    (["--dp-replicate", "-1"], r"`--dp-replicate` \(-1\) must be an integer >= 1\."),
    (["--rank", "-1"], r"`--rank` \(-1\) must be an integer >= 0\."),
    (["--rank", "2"], r"`--rank` \(2\) must be less than the world size \(2\)\."),
]


def _one_error(capsys, prog: str, pattern: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    first = err.splitlines()[0]
    assert first.startswith(f"moetx {prog}: CommandLineError: "), err
    assert re.search(pattern, err), err
    assert re.search(r"\n  fix: .*--help", err), err
    return err


@pytest.mark.parametrize(("argv", "pattern"), DEMO_BAD, ids=[" ".join(a) for a, _ in DEMO_BAD])
def test_demo_refuses_out_of_range_arguments(capsys, argv, pattern):
    """Exit 2 and one `moetx demo: CommandLineError: ...` message naming the flag, no traceback."""
    assert demo.main(argv) == 2
    _one_error(capsys, "demo", pattern)


@pytest.mark.parametrize(("argv", "pattern"), PLAN_BAD, ids=[" ".join(a) for a, _ in PLAN_BAD])
def test_plan_refuses_out_of_range_arguments(capsys, argv, pattern):
    """Same for `moetx plan`."""
    assert plan.main(argv) == 2
    _one_error(capsys, "plan", pattern)


def test_every_bad_argument_is_reported_at_once(capsys):
    """`--ranks 0 --steps 0` names both flags (and does not blame `ep`)."""
    assert demo.main(["--ranks", "0", "--steps", "0"]) == 2
    err = _one_error(capsys, "demo", r"`--ranks` \(0\)")
    assert "`--steps` (0)" in err
    assert "`ep`" not in err


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (
            ["--reshard-after-forward", "1"],
            r"^moetx plan: PassOptionError: `FSDP\.reshard_after_forward` \(1\) must be True, "
            r"False or an int >= 2",
        ),
        (
            ["--ep", "2", "--reshard-after-forward", "2"],
            r"^moetx plan: PassPreconditionError: `FSDP\(reshard_after_forward=2\)` cannot "
            r"reshard the routed experts to groups of 2",
        ),
    ],
)
def test_plan_reports_option_and_precondition_errors(capsys, argv, pattern):
    """Bad FSDP options and unmet preconditions reach the command line as one teaching error."""
    assert plan.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(pattern, err), err
