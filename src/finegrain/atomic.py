"""Files written whole or not at all: a temporary file in the same folder, flushed to disk, then renamed over the
target. A failure removes the temporary file and leaves the previous version in place; a full disk becomes one
clear error (exit 2) instead of what the writer happened to raise: PyTorch's zip writer says ``RuntimeError:
[enforce fail at inline_container.cc:672] unexpected pos``, a traceback that never says "disk full".
Temporary files of a run that was killed mid-write are removed when the run starts again
(:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from finegrain.errors import DiskFullError

TEMP_SUFFIX = ".tmp"
#: below this much free space after a failed write, the disk was full whatever the writer said
FULL_BELOW = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | Path, expected_bytes: int = 0) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` when the block ends cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full(e, path, expected_bytes)  # before the partial file goes: it is what filled the disk
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise


def disk_full(error: BaseException, path: Path, expected_bytes: int = 0) -> DiskFullError | None:
    """The clear error for ``error`` if it came from a full disk while writing ``path`` (else None)."""
    free = shutil.disk_usage(path.parent).free
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or (isinstance(error, RuntimeError | OSError) and free < FULL_BELOW):
        return DiskFullError(path, mount_point(path.parent), expected_bytes, free)
    return None


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    with atomic_path(path, len(text.encode(encoding))) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def mount_point(folder: Path) -> Path:
    folder = folder.resolve()
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Temporary files :func:`atomic_path` left in ``folder`` when its process was killed mid-write."""
    stale = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
