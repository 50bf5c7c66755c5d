"""Nothing half-written: a file or folder is written beside its target, then renamed over it.

    with staged_file(path) as tmp:      # tmp: a fresh temp file in path's folder
        save_file(state, tmp)           # on success tmp replaces path; on any error it is deleted

The result gets the permissions a plain ``open()`` / ``mkdir()`` would give it (the umask's), not
the owner-only ones of ``tempfile``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file beside ``path`` that replaces ``path`` when the block succeeds (else is removed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside ``path`` that replaces ``path`` (file or folder) when the block succeeds.

    The old ``path`` is moved aside, the new one renamed in (the old one is put back if that fails),
    then the old one deleted, best effort. On any error before the swap the temp folder is removed
    and ``path`` is left as it was. Creates ``path``'s parent folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists() or path.is_symlink():
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
