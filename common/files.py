"""Small files written atomically: a reader (the launcher, a sweep table, a loader reading a manifest, a
resumed conversion) sees the old file or the new one, never half. The one writer of summary.json,
eval_<set>.json, export.json, config.yaml, manifest.json, a converter's progress file and train.embed's output."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO


def write_text_atomic(path: str, text: str) -> None:
    """`text` into a temp file in the same folder, fsync, then rename onto `path`."""
    write_file_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_file_atomic(path: str, write: Callable[[BinaryIO], object]) -> None:
    """write(file) into a temp file in the same folder, fsync, then rename onto `path` (e.g. a torch.save)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # mkstemp makes a private 0600 file; the result must be as readable as a file open() makes (a shared
        # dataset's manifest.json next to its 0644 shards)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it: put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: str, obj: Any, indent: int = 1, sort_keys: bool = False) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
