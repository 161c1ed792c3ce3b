"""Writing files and folders whole or not at all.

A checkpoint or golden is written under a temporary name in the destination's own folder and renamed to its
final name only once every byte is written: rename is atomic within a file system, so a reader (or a user
after a crash, Ctrl-C or a full disk) finds either the complete result or nothing under the final name. A
failed write removes its temporary; one killed outright leaves a hidden ".NAME.*.partial" that no loader
mistakes for a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_folder(dst) -> Iterator[Path]:
    """Yield an empty temporary folder beside dst; on success it becomes dst, on any exception it is removed.

    dst must not exist, or be an empty folder (FileExistsError otherwise, before anything is written).
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # as mkdir would have made it (mkdtemp makes it private)
        yield tmp
        if dst.is_dir():
            dst.rmdir()  # still empty (checked above); replace() cannot put a folder over a folder everywhere
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(dst) -> Iterator[Path]:
    """Yield a temporary file path beside dst; on success it replaces dst, on any exception it is removed
    (an existing dst is then left untouched)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o666 & ~_umask())  # as open() would have made it (mkstemp makes it private)
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
