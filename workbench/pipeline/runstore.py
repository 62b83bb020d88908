"""A run directory: atomic file writes, and stages cached by a hash of their inputs so a rerun resumes.

Every file is written to a temporary name and renamed into place, so a killed run never leaves a
half-written table that a later run would trust. A stage records the hash of its inputs and the files it
wrote in `stages/<name>.json` only after all its files are in place: a stage is reused when that record
exists, its hash matches and its files are all present.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from workbench.errors import RunDirError
from workbench.files import atomic_write


class RunDir:
    """A directory holding one study's outputs."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirError(f"cannot use {self.root} as a run directory: {error}") from error

    def path(self, relative: str) -> Path:
        """A path inside the run directory (anything pointing outside is refused)."""
        target = (self.root / relative).resolve()
        if self.root not in target.parents and target != self.root:
            raise RunDirError(f"{relative!r} points outside the run directory {self.root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_bytes(self, relative: str, data: bytes) -> Path:
        target = self.path(relative)
        atomic_write(target, data)
        return target

    def write_text(self, relative: str, text: str) -> Path:
        return self.write_bytes(relative, text.encode())

    def write_json(self, relative: str, obj) -> Path:
        return self.write_text(relative, json.dumps(obj, indent=2, default=_json_default))

    def read_json(self, relative: str):
        return json.loads(self.path(relative).read_text())

    def write_table(self, relative: str, frame: pd.DataFrame) -> Path:
        return atomic_write(self.path(relative), lambda path: frame.to_parquet(path, index=False))

    def read_table(self, relative: str) -> pd.DataFrame:
        return pd.read_parquet(self.path(relative))

    def read_table_if_present(self, relative: str) -> pd.DataFrame | None:
        """The table, or None where the run has not written it (a stage it did not run)."""
        return self.read_table(relative) if self.path(relative).exists() else None

    def cached(self, stage: str, inputs: dict, outputs: list[str], compute: Callable[[], None],
               after: tuple[str, ...] = ()) -> bool:
        """Run `compute` (which writes `outputs`) unless a finished run with the same inputs exists.

        `after`: the earlier stages whose outputs `compute` reads; their recorded input hashes are part of this
        stage's inputs, so a recomputed earlier stage recomputes this one too. Returns True when the stage was
        reused from disk.
        """
        key = input_hash({**inputs, "after": {name: self.stage_hash(name) for name in after}} if after else inputs)
        record = self.path(f"stages/{stage}.json")
        if record.exists():
            done = json.loads(record.read_text())
            if done.get("hash") == key and all(self.path(o).exists() for o in outputs):
                return True
            record.unlink()  # the outputs are about to change: the old record must not vouch for them
        compute()
        missing = [o for o in outputs if not self.path(o).exists()]
        if missing:
            raise RuntimeError(f"stage {stage} did not write {missing}")
        self.write_json(f"stages/{stage}.json", {"hash": key, "outputs": outputs})
        return False

    def stage_hash(self, stage: str) -> str:
        """The input hash a finished stage was recorded with."""
        record = self.path(f"stages/{stage}.json")
        if not record.exists():
            raise RunDirError(f"{self.root}: stage {stage!r} has not finished; it must run before the stages that "
                              "read its outputs")
        return json.loads(record.read_text())["hash"]


def input_hash(inputs: dict) -> str:
    """A stable hash of a JSON-serialisable description of a stage's inputs."""
    text = json.dumps(inputs, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
