"""File primitives shared by every stage: atomic folder and file writes with crash recovery, and hashing.

A folder is written into a temporary sibling and swapped into place by renames, so an interrupted write never
leaves a half-written result and never destroys the previous one. The swap is two renames (the old folder
aside, the new one in); a crash between them leaves only `.NAME.old`, which `recover_dir` puts back.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError


def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_dir(final: str | Path) -> None:
    """Undo a swap interrupted between its two renames: the previous folder is complete, put it back."""
    final = Path(final)
    if not final.exists() and _old(final).exists():
        os.replace(_old(final), final)


def replace_dir(src: str | Path, final: str | Path) -> None:
    """Move the finished folder `src` to `final`, replacing what was there (see the module doc)."""
    src, final = Path(src), Path(final)
    old = _old(final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(src, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder; on success it replaces `final`; on an exception it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`data` in `path`, whole or not at all (a temporary file beside it, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _update(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()


def sha256_tree(folder: str | Path) -> str:
    """sha256 over a folder's files, names and bytes, in sorted order."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        _update(h, f)
    return h.hexdigest()


PACKAGE_DIR = Path(__file__).resolve().parent
# The shipped models and classifier were bench/NAME before they became package data under assets/.
_MOVED = {f"bench/{name}": f"assets/{name}" for name in ("teacher", "dit-teacher", "classifier")}


def shipped(path: str | Path) -> Path:
    """`path` as given when it exists; else, for a relative path naming something qdistill ships
    (`assets/teacher`, `assets/dit-teacher`, `assets/classifier`), the installed copy; else `path` unchanged
    (callers report it). An old name of a shipped folder (`bench/teacher`) is refused with its new name."""
    path = Path(path)
    if not path.exists() and not path.is_absolute():
        if (PACKAGE_DIR / path).exists():
            return PACKAGE_DIR / path
        moved = _MOVED.get(path.as_posix().rstrip("/"))
        if moved:
            raise ConfigError(f"{path}: the shipped folder is now {moved}")
    return path
