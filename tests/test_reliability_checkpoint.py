"""Checkpoints that are damaged, crafted or do not fit the model fail loudly, as `CheckpointError`.

Before: torch's `CheckpointException` (a `BaseException`, which escapes `except Exception`,
its first line a list of ranks) for a missing or truncated shard file or a model of another
shape; a flipped byte in a shard loaded silently; `.metadata` (and byte entries in shards) were
unpickled with plain pickle, so a crafted checkpoint ran code; and nothing tested that the
optimizer's param-group hyperparameters come back.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from moetx.core.algebra import Pipeline
from moetx.mesh.parallel_mesh import MeshDegrees
from moetx.models import MoEConfig
from moetx.passes import FSDP, ExpertParallel
from moetx.testing.train import TrainSpec, build_model
from moetx.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.bodies import reliability as bodies
from tests.bodies.end_to_end import make_optimizer

SPEC = TrainSpec(config=MoEConfig(num_experts=4, num_layers=2, num_dense_layers=1), steps=2)
EP_FSDP = ExpertParallel() | FSDP()
SHARD = "__0_0.distcp"


def _saved(path: Path, spec: TrainSpec = SPEC) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and AdamW after one step, saved to `path` (one process, no process group)."""
    model = build_model(spec)
    opt = make_optimizer(model, spec.lr)
    model(torch.randint(0, 32, (2, 8)), labels=torch.randint(0, 32, (2, 8))).loss.backward()
    opt.step()
    save_checkpoint(path, model, opt)
    return model, opt


def _fresh(spec: TrainSpec = SPEC) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(attrs.evolve(spec, seed=spec.seed + 1))
    return model, make_optimizer(model, spec.lr)


# --------------------------------------------------------------------- damaged shard files (9)


def test_missing_shard_file_names_the_file_and_a_key(tmp_path):
    """A deleted `__0_0.distcp`: `CheckpointError` (an `Exception`) naming it and what it holds."""
    _saved(tmp_path)
    (tmp_path / SHARD).unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"^The checkpoint file `{re.escape(str(tmp_path / SHARD))}` is missing; it holds "
        r"`model\.[\w.]+` and \d+ more entries\.\n  fix: copy the whole checkpoint directory",
    ):
        load_checkpoint(tmp_path, *_fresh())


@pytest.mark.parametrize("verify", [True, False], ids=["hashes", "no-hashes"])
def test_truncated_shard_file_names_the_file(tmp_path, verify):
    """Half a shard file: the size against the recorded one, or against what the metadata needs."""
    _saved(tmp_path)
    shard = tmp_path / SHARD
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    if verify:
        match = (
            rf"^The checkpoint file `{re.escape(str(shard))}` has {size // 2} bytes, but {size} "
            r"were written when it was saved \(truncated or overwritten\)\.\n  fix: "
        )
    else:
        match = (
            rf"^The checkpoint file `{re.escape(str(shard))}` is truncated: it has {size // 2} "
            r"bytes, but `[\w.]+` is stored up to byte \d+\.\n  fix: "
        )
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path, *_fresh(), verify=verify)


def test_model_of_another_config_names_each_parameter_and_both_shapes(tmp_path):
    """Saved with 4 experts, loaded into 8: every differing tensor with its two shapes."""
    _saved(tmp_path)
    other = attrs.evolve(SPEC, config=attrs.evolve(SPEC.config, num_experts=8))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, *_fresh(other))
    lines = str(info.value).splitlines()
    assert re.match(
        rf"^The checkpoint `{re.escape(str(tmp_path))}` does not fit the model: \d+ tensors "
        r"differ in shape and 0 are missing\.$",
        lines[0],
    ), lines[0]
    assert (
        "  `model.model.layers.1.mlp.experts.gate_up_proj`: checkpoint [4, 16, 16], "
        "model [8, 16, 16]" in lines
    ), lines
    assert "  `model.model.layers.1.mlp.gate.weight`: checkpoint [4, 16], model [8, 16]" in lines
    assert (
        "  `optim.state.model.layers.1.mlp.experts.down_proj.exp_avg`: checkpoint [4, 16, 8], "
        "model [8, 16, 8]" in lines
    ), lines
    assert lines[-1].startswith("  fix: build the model with the config it was saved with")


def test_model_with_more_layers_names_the_missing_keys(tmp_path):
    """A model with a layer the checkpoint lacks: the missing keys, before any file is read."""
    _saved(tmp_path)
    other = attrs.evolve(SPEC, config=attrs.evolve(SPEC.config, num_layers=3))
    with pytest.raises(
        CheckpointError,
        match=r"does not fit the model: 0 tensors differ in shape and \d+ are missing\.\n"
        r"(?s:.*)  `model\.model\.layers\.2\.[\w.]+`: missing from the checkpoint\n",
    ):
        load_checkpoint(tmp_path, *_fresh(other))


def test_wrong_config_on_2_ranks_raises_on_every_rank(pool2, tmp_path):
    """EP+FSDP on 2 ranks, saved with 4 experts and loaded with 8: both ranks, one message."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    pool2.run(bodies.save_trained, SPEC, EP_FSDP, degrees, str(tmp_path))
    other = attrs.evolve(SPEC, config=attrs.evolve(SPEC.config, num_experts=8))
    results = pool2.run(bodies.load_outcome, other, EP_FSDP, degrees, str(tmp_path))
    for rank, (kind, message) in enumerate(results):
        assert kind == "CheckpointError", (rank, kind, message)
        assert "does not fit the model" in message.splitlines()[0], (rank, message)
    assert results[0] == results[1]


def test_failed_save_is_a_checkpoint_error_naming_each_rank(tmp_path):
    """Saving to a path that is a regular file: `CheckpointError` with the rank's own error."""
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    with pytest.raises(
        CheckpointError,
        match=rf"^Saving the checkpoint `{re.escape(str(target))}` failed on rank\(s\) 0\.\n"
        r"  rank 0: FileExistsError: ",
    ):
        save_checkpoint(target, build_model(SPEC))


# --------------------------------------------------------------------------- integrity (10)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_flipped_byte_in_a_shard_is_caught(tmp_path):
    """One bit of one byte in the middle of the shard: the file's hash no longer matches."""
    _saved(tmp_path)
    shard = tmp_path / SHARD
    _flip(shard, shard.stat().st_size // 2)
    with pytest.raises(
        CheckpointError,
        match=rf"^The checkpoint file `{re.escape(str(shard))}` is corrupt: its SHA-256 differs "
        r"from the one recorded when it was saved \([0-9a-f]{12}… vs [0-9a-f]{12}…\)\.\n"
        r"  fix: copy it again from a good source, or load an earlier checkpoint",
    ):
        load_checkpoint(tmp_path, *_fresh())
    load_checkpoint(tmp_path, *_fresh(), verify=False)  # the escape hatch loads it anyway


def test_flipped_byte_in_the_metadata_is_caught(tmp_path):
    """`.metadata` is hashed too (by the coordinator) and checked before it is unpickled."""
    _saved(tmp_path)
    meta = tmp_path / ".metadata"
    _flip(meta, meta.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=r"^The checkpoint file `.*\.metadata` is corrupt"):
        load_checkpoint(tmp_path, *_fresh())


def test_flipped_byte_on_2_ranks_raises_on_every_rank(pool2, tmp_path):
    """Saved on 2 ranks; rank 1's shard damaged: both loading ranks raise, naming that file."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    pool2.run(bodies.save_trained, SPEC, EP_FSDP, degrees, str(tmp_path))
    shard = tmp_path / "__1_0.distcp"
    _flip(shard, shard.stat().st_size // 3)
    results = pool2.run(bodies.load_outcome, SPEC, EP_FSDP, degrees, str(tmp_path))
    for rank, (kind, message) in enumerate(results):
        assert kind == "CheckpointError", (rank, kind, message)
        assert message.startswith(f"The checkpoint file `{shard}` is corrupt"), (rank, message)


def test_a_clean_checkpoint_still_loads_on_2_ranks(pool2, tmp_path):
    """The hashes written on 2 ranks verify: the load succeeds on both."""
    degrees = MeshDegrees(dp_shard=2, ep=2)
    pool2.run(bodies.save_trained, SPEC, EP_FSDP, degrees, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if "integrity" in p.name) == [
        ".moetx-integrity-0.json",
        ".moetx-integrity-1.json",
    ]
    assert pool2.run(bodies.load_outcome, SPEC, EP_FSDP, degrees, str(tmp_path)) == ["loaded"] * 2


def test_shard_without_a_record_is_refused(tmp_path):
    """Records exist but none lists the shard (a file swapped in after the save)."""
    import json

    _saved(tmp_path)
    manifest = tmp_path / ".moetx-integrity-0.json"
    record = json.loads(manifest.read_text())
    del record["files"][SHARD]
    manifest.write_text(json.dumps(record))
    with pytest.raises(
        CheckpointError,
        match=rf"^The checkpoint file `{re.escape(str(tmp_path / SHARD))}` has no recorded hash, "
        r"though the checkpoint has integrity records \(`\.moetx-integrity-\*\.json`\)\.\n"
        r"  fix: copy it again",
    ):
        load_checkpoint(tmp_path, *_fresh())


def test_unreadable_integrity_record_is_named(tmp_path):
    """A damaged `.moetx-integrity-0.json`: named, with the parser's complaint."""
    _saved(tmp_path)
    (tmp_path / ".moetx-integrity-0.json").write_text("{not json")
    with pytest.raises(
        CheckpointError,
        match=r"^The checkpoint integrity record `.*\.moetx-integrity-0\.json` cannot be read "
        r"\(JSONDecodeError: ",
    ):
        load_checkpoint(tmp_path, *_fresh())


def test_unreadable_metadata_without_records_is_named(tmp_path):
    """No records to check against: a truncated `.metadata` fails to unpickle, named."""
    _saved(tmp_path)
    meta = tmp_path / ".metadata"
    meta.write_bytes(meta.read_bytes()[:100])
    with pytest.raises(
        CheckpointError,
        match=r"^The checkpoint metadata `.*\.metadata` cannot be read \((UnpicklingError|EOFError)",
    ):
        load_checkpoint(tmp_path, *_fresh(), verify=False)


def test_metadata_of_another_type_is_refused(tmp_path):
    """A `.metadata` holding a plain dict (allowed pickle, wrong type)."""
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(
        CheckpointError,
        match=r"^The checkpoint metadata `.*\.metadata` holds a `dict`, not DCP `Metadata`\.\n"
        r"  fix: load only checkpoints from a trusted source",
    ):
        load_checkpoint(tmp_path, build_model(SPEC))


def test_other_read_failures_name_the_rank_and_its_error(tmp_path):
    """A shard of the right size but all zeros, without hashes: torch's own error, per rank."""
    _saved(tmp_path)
    shard = tmp_path / SHARD
    shard.write_bytes(bytes(shard.stat().st_size))
    with pytest.raises(
        CheckpointError,
        match=rf"^Loading the checkpoint `{re.escape(str(tmp_path))}` failed on rank\(s\) 0\.\n"
        r"  rank 0: \w+: .*\n  fix: see each rank's error above",
    ):
        load_checkpoint(tmp_path, *_fresh(), verify=False)


# ------------------------------------------------------------------- crafted checkpoints (11)


class _Payload:
    """Unpickles as `os.mkdir(marker)`: a visible side effect standing in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_crafted_metadata_is_refused_without_running_it(tmp_path):
    """A `.metadata` whose unpickling calls `os.mkdir`: refused, and the directory is not made."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(
        CheckpointError,
        match=r"^The checkpoint metadata `.*\.metadata` refers to `(posix|os)\.mkdir`, which is "
        r"not a DCP metadata type; moetx does not unpickle it \(it could run code\)\.\n"
        r"  fix: load only checkpoints from a trusted source",
    ):
        load_checkpoint(ckpt, build_model(SPEC))
    assert not marker.exists()


def test_crafted_byte_entry_in_a_shard_is_refused_without_running_it(tmp_path):
    """An optimizer byte entry (a param-group value) replaced by a pickle calling `os.mkdir`."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    _saved(tmp_path / "ckpt")
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    for manifest in ckpt.glob(".moetx-integrity-*.json"):
        manifest.unlink()  # the attacker rewrites files; hashes protect against accidents only
    meta = pickle.loads((ckpt / ".metadata").read_bytes())
    key = next(
        k
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, BytesStorageMetadata) and k.endswith(".lr")
    )
    payload = pickle.dumps(_Payload(marker), protocol=2)  # torch.load's default protocol
    shard = ckpt / SHARD
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    meta.storage_data[MetadataIndex(key)] = _StorageInfo(SHARD, offset, len(payload))
    buf = io.BytesIO()
    pickle.dump(meta, buf)
    (ckpt / ".metadata").write_bytes(buf.getvalue())
    with pytest.raises(
        CheckpointError,
        match=rf"^The checkpoint entry `{re.escape(key)}` does not load with "
        r"`torch\.load\(weights_only=True\)`",
    ):
        load_checkpoint(ckpt, *_fresh())
    assert not marker.exists()


# ------------------------------------------------------------- optimizer hyperparameters (12)


def test_param_group_hyperparameters_come_back_in_one_process(tmp_path):
    """A scheduler-decayed lr and a changed weight decay are restored into a fresh AdamW."""
    model, opt = _saved(tmp_path / "first")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    opt.step()
    scheduler.step()
    for group in opt.param_groups:
        group["weight_decay"] = 0.125
    save_checkpoint(tmp_path / "second", model, opt)
    fresh, fresh_opt = _fresh()
    load_checkpoint(tmp_path / "second", fresh, fresh_opt)
    assert [(g["lr"], g["weight_decay"]) for g in fresh_opt.param_groups] == [
        (SPEC.lr * 0.25, 0.125)
    ]


@pytest.mark.parametrize(
    ("pipeline", "degrees"),
    [(EP_FSDP, MeshDegrees(dp_shard=2, ep=2)), (Pipeline() | FSDP(), MeshDegrees(dp_shard=2))],
    ids=["ep-fsdp", "fsdp"],
)
def test_param_group_hyperparameters_come_back_on_2_ranks(pool2, tmp_path, pipeline, degrees):
    """Two scheduler steps (lr x 1/16) and weight decay 0.125 survive save and load."""
    for rank, res in enumerate(
        pool2.run(bodies.hyperparameters_round_trip, SPEC, pipeline, degrees, str(tmp_path))
    ):
        assert res["saved"] == [(SPEC.lr / 16, 0.125)] * len(res["saved"]), (rank, res)
        assert res["loaded"] == res["saved"], (rank, res)
