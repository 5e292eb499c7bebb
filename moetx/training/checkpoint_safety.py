"""Safe reading of DCP checkpoints: content hashes, allow-listed unpickling, errors that name files.

torch's `FileSystemReader` unpickles `.metadata` with plain `pickle` and its default planner
loads byte entries with `torch.load(weights_only=False)`, so a crafted checkpoint ran code on
load; a flipped byte in a shard loaded silently; and a missing or truncated file surfaced as a
`CheckpointException` (a `BaseException`, which escapes `except Exception`). Here:

- `write_manifest`: after `dcp.save`, each rank records the SHA-256 and size of the files it
  wrote (the coordinator also of `.metadata`) in `.moetx-integrity-{rank}.json`.
- `SafeReader`: checks every file before reading it (present, long enough, and the recorded
  size and hash when there are manifests) and unpickles `.metadata` with an allow-list of
  DCP's own metadata types.
- `SafeLoadPlanner`: loads byte entries with `torch.load(weights_only=True)`.
- `checkpoint_error`: turns a `CheckpointException` into a `CheckpointError`, keeping a
  moetx error raised on some rank as it is (so every rank raises the same message).

The hashes guard against accidents (a bad copy, a disk error), not against an attacker, who
can rewrite the manifests too; the allow-lists are what keep a crafted checkpoint from running
code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterable
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from moetx.core.errors import CheckpointError

__all__ = [
    "SafeLoadPlanner",
    "SafeReader",
    "checkpoint_error",
    "remove_manifests",
    "write_manifest",
]

MANIFEST_PREFIX = ".moetx-integrity-"
METADATA = ".metadata"
_CHUNK = 8 << 20
_TRUSTED_FIX = (
    "  fix: load only checkpoints from a trusted source, written by `save_checkpoint` or "
    "`torch.distributed.checkpoint.save`."
)
_CORRUPT_FIX = (
    "  fix: copy it again from a good source, or load an earlier checkpoint "
    "(`load_checkpoint(..., verify=False)` skips the hashes)."
)

#: What `.metadata` may refer to: DCP's metadata classes and the torch types they hold.
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset(
        {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}
    ),
    "collections": frozenset({"OrderedDict"}),
}


# ------------------------------------------------------------------------------- manifests


def sha256_file(path: str) -> str:
    """The hex SHA-256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_path(path: str, rank: int) -> str:
    return os.path.join(path, f"{MANIFEST_PREFIX}{rank}.json")


def remove_manifests(path: str, ranks: Iterable[int]) -> None:
    """Delete the manifests of `ranks` (before a save overwrites their files)."""
    for rank in ranks:
        with contextlib.suppress(FileNotFoundError):
            os.remove(_manifest_path(path, rank))


def stale_manifest_ranks(path: str, world_size: int) -> list[int]:
    """Ranks at or above `world_size` that left a manifest in `path` (an earlier, larger save)."""
    ranks = []
    for name in os.listdir(path) if os.path.isdir(path) else ():
        stem = name.removeprefix(MANIFEST_PREFIX).removesuffix(".json")
        if name.startswith(MANIFEST_PREFIX) and stem.isdigit() and int(stem) >= world_size:
            ranks.append(int(stem))
    return ranks


def write_manifest(path: str, rank: int, *, coordinator: bool) -> None:
    """Record size and SHA-256 of the files rank `rank` wrote (`__{rank}_*.distcp`).

    The coordinator also records `.metadata`. Written to a temporary name and renamed, so a
    reader never sees half a manifest.
    """
    names = sorted(
        n for n in os.listdir(path) if n.startswith(f"__{rank}_") and n.endswith(".distcp")
    )
    if coordinator:
        names.append(METADATA)
    files = {}
    for name in names:
        full = os.path.join(path, name)
        files[name] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
    target = _manifest_path(path, rank)
    with open(target + ".tmp", "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
    os.replace(target + ".tmp", target)


def read_manifests(path: str) -> dict[str, dict[str, Any]] | None:
    """File name -> `{"bytes", "sha256"}` from every manifest in `path`; None if there is none."""
    names = [n for n in os.listdir(path) if n.startswith(MANIFEST_PREFIX) and n.endswith(".json")]
    if not names:
        return None
    files: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        try:
            with open(os.path.join(path, name)) as f:
                files.update(json.load(f)["files"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"The checkpoint integrity record `{os.path.join(path, name)}` cannot be read "
                f"({type(exc).__name__}: {exc}).\n{_CORRUPT_FIX}"
            ) from None
    return files


# ---------------------------------------------------------------------------------- reading


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only DCP metadata types (`_ALLOWED`, plus torch dtypes)."""

    def __init__(self, file: IO[bytes], path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"The checkpoint metadata `{self._path}` refers to `{module}.{name}`, which is not "
            "a DCP metadata type; moetx does not unpickle it (it could run code).\n" + _TRUSTED_FIX
        )


class SafeReader(FileSystemReader):
    """`FileSystemReader` that checks each file before reading it and unpickles safely.

    Args:
        path: Checkpoint directory.
        verify: Check sizes and SHA-256 against the manifests `save_checkpoint` wrote (when
            the checkpoint has any); missing and truncated files are reported either way.
    """

    def __init__(self, path: str, *, verify: bool = True) -> None:
        super().__init__(path)
        self.directory = path
        self.manifest = read_manifests(path) if verify else None
        self._checked: set[str] = set()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata, its hash checked and its pickle restricted to DCP types."""
        path = os.fspath(self._get_metadata_path(kwargs.get("rank")))
        self.check_file(os.path.basename(path), [])
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, path).load()
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(
                    f"The checkpoint metadata `{path}` cannot be read ({type(exc).__name__}: "
                    f"{exc}).\n{_CORRUPT_FIX}"
                ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(
                f"The checkpoint metadata `{path}` holds a `{type(metadata).__name__}`, not "
                f"DCP `Metadata`.\n{_TRUSTED_FIX}"
            )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]  # as torch does
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Check every file the plan reads from, then read as `FileSystemReader` does."""
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                item
            )
        for relative_path, items in per_file.items():
            self.check_file(relative_path, items)
        return super().read_data(plan, planner)

    def check_file(self, name: str, items: list[ReadItem]) -> None:
        """Raise `CheckpointError` if file `name` is missing, short, or not as it was saved."""
        if name in self._checked:
            return
        full = os.path.join(self.directory, name)
        keys = [item.storage_index.fqn for item in items]
        holds = f"; it holds `{keys[0]}`" if keys else ""
        holds += f" and {len(keys) - 1} more entries" if len(keys) > 1 else ""
        if not os.path.isfile(full):
            raise CheckpointError(
                f"The checkpoint file `{full}` is missing{holds}.\n"
                "  fix: copy the whole checkpoint directory (`.metadata` and every "
                "`__*_*.distcp` file)."
            )
        size = os.path.getsize(full)
        record = None if self.manifest is None else self.manifest.get(name)
        if self.manifest is not None and record is None:
            raise CheckpointError(
                f"The checkpoint file `{full}` has no recorded hash, though the checkpoint has "
                f"integrity records (`{MANIFEST_PREFIX}*.json`).\n{_CORRUPT_FIX}"
            )
        if record is not None:
            self._check_recorded(full, size, record)
        else:
            self._check_long_enough(full, size, items)
        self._checked.add(name)

    @staticmethod
    def _check_recorded(full: str, size: int, record: dict[str, Any]) -> None:
        if size != record["bytes"]:
            raise CheckpointError(
                f"The checkpoint file `{full}` has {size} bytes, but {record['bytes']} were "
                f"written when it was saved (truncated or overwritten).\n{_CORRUPT_FIX}"
            )
        digest = sha256_file(full)
        if digest != record["sha256"]:
            raise CheckpointError(
                f"The checkpoint file `{full}` is corrupt: its SHA-256 differs from the one "
                f"recorded when it was saved ({digest[:12]}… vs {record['sha256'][:12]}…).\n"
                + _CORRUPT_FIX
            )

    def _check_long_enough(self, full: str, size: int, items: list[ReadItem]) -> None:
        ends = [
            (info.offset + info.length, item.storage_index.fqn)
            for item in items
            for info in [self.storage_data[item.storage_index]]
        ]
        end, key = max(ends, default=(0, ""))
        if end > size:
            raise CheckpointError(
                f"The checkpoint file `{full}` is truncated: it has {size} bytes, but `{key}` is "
                f"stored up to byte {end}.\n"
                "  fix: the copy is incomplete or the save was interrupted: copy it again, or "
                "load an earlier checkpoint."
            )


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` loading byte entries with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Set one non-tensor entry (an optimizer param-group value, say)."""
        key = read_item.storage_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(
                f"The checkpoint entry `{key}` does not load with `torch.load(weights_only=True)`"
                f" ({type(exc).__name__}: {first}); moetx does not unpickle it fully (it could "
                f"run code).\n{_TRUSTED_FIX}"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ----------------------------------------------------------------------------------- errors


def checkpoint_error(what: str, path: str, exc: CheckpointException) -> CheckpointError:
    """A `CheckpointError` for a failed `dcp.save`/`dcp.load` (`what`: "Saving", "Loading").

    A `CheckpointError` raised on any rank (by `SafeReader`, say) is returned as it is, the
    lowest rank's, with a note naming the ranks: DCP sends every rank's failure to every rank,
    so all of them raise the same message. Anything else becomes one line per failing rank.
    """
    failures = {rank: pair[0] for rank, pair in sorted(exc.failures.items())}
    ours = {rank: e for rank, e in failures.items() if isinstance(e, CheckpointError)}
    if ours:
        err = next(iter(ours.values()))
        err.add_note(f"(raised on rank(s) {', '.join(map(str, ours))}, reported on every rank)")
        return err
    lines = [
        f"  rank {rank}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        for rank, e in failures.items()
    ]
    return CheckpointError(
        f"{what} the checkpoint `{path}` failed on rank(s) "
        f"{', '.join(map(str, failures))}.\n" + "\n".join(lines) + "\n"
        "  fix: see each rank's error above; the directory must be on a file system every "
        "rank can read and write."
    )
