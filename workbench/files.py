"""Files written whole: every table, score, plan, figure and report goes through `atomic_write`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write bytes, text, or what `data(path)` writes to a temporary file beside `target`, give it the
    permissions of a newly created file (the user's umask; a temporary file would keep 0600), then rename it
    into place: a reader never sees half a file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            if not callable(data):
                file.write(data.encode("utf-8") if isinstance(data, str) else data)
        if callable(data):
            data(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
