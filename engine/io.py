"""File I/O. Atomic writes: a reader never sees a half-written file, and a failed write leaves the old one intact.

Written files get the mode any new file would get (0o666 minus the umask: 0644 under the usual 0022), or the
mode of the file they replace; the temporary file's private 0600 never reaches the result. Folders built aside
(``atomic_dir``) get a new folder's mode (0o777 minus the umask).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary file keeps ``path``'s suffix so writers that pick a format by suffix still work.
    """
    path = _writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, _target_mode(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``paths`` (files of one folder) for a writer that makes them together
    under their own names, such as an ONNX file and the external data it refers to by name. On success each is
    renamed onto its path in the order given (name the file that refers to the others last, so it never points
    at a file not yet in place); on error the folder is removed and nothing is touched. Each file is replaced
    atomically, the group is not: a process killed between two renames leaves the new files named before."""
    import shutil

    paths = [Path(p) for p in paths]
    folder = paths[-1].parent
    if any(p.parent != folder for p in paths):
        raise ValueError(f"atomic_files: {[str(p) for p in paths]} are not in one folder")
    for p in paths:
        _writable(p)
    tmp = Path(tempfile.mkdtemp(prefix=f".{paths[-1].name}.", dir=folder))
    try:
        yield tmp
        for p in paths:
            os.chmod(tmp / p.name, _target_mode(p))
        for p in paths:
            os.replace(tmp / p.name, p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _writable(path: str | os.PathLike) -> Path:
    """``path`` as a Path, if a file can be written there (raises naming what is in the way)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory; give a file path")
    if problem := parent_problem(path):
        error = NotADirectoryError if _file_in_the_way(path) else FileNotFoundError
        raise error(f"cannot write {str(path)!r}: {problem}")
    return path


def make_folder(path: str | os.PathLike, who: str) -> Path:
    """The folder at ``path``, made with its parents if missing; raises naming ``who`` (the function writing into
    it) when the path is empty or a file stands where a folder must be."""
    if not str(path).strip():
        raise ValueError(f"{who}: give a folder path, got {str(path)!r}")
    if problem := folder_problem(path):
        raise NotADirectoryError(f"{who}: {problem}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why no folder can be at ``path``, made with its parents if missing (None: one can): a file in the way."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{str(path)!r} exists and is not a directory"
    if problem := parent_problem(path, create=True):
        return f"cannot make {str(path)!r}: {problem}"
    return None


def parent_problem(path: str | os.PathLike, create: bool = False) -> str | None:
    """Why nothing can be made at ``path`` for want of its folder (None: the folder is there). ``create``: the
    missing folders will be made, so only a file in their way is a problem."""
    parent = Path(path).parent
    if parent.is_dir():
        return None
    if (file := _file_in_the_way(path)) is not None:
        return f"{str(file)!r} is a file, not a directory"
    return None if create else f"directory {str(parent)!r} does not exist"


def _file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest of ``path``'s parents that exists, when it is not a folder."""
    parent = Path(path).parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it: restore at once
    os.umask(umask)
    return umask


def _target_mode(path: Path) -> int:
    """The replaced file's permission bits, or a new file's: 0o666 minus the process umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (any folder or file there is
    removed only then), on error it is removed. A symbolic link at ``path`` is followed: the folder lands where
    it points, and the link stays. The folder gets a new folder's mode (0o777 minus the umask)."""
    import shutil

    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if problem := parent_problem(path, create=True):
        raise NotADirectoryError(f"cannot write {str(path)!r}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_json(path: str | os.PathLike, fix: str = "") -> Any:
    """The JSON value in the file at ``path``; a file that is not JSON is a ValueError naming it (then ``fix``,
    what to do about it)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})" + (f"; {fix}" if fix else "")) from None


class folder_load_errors:
    """``with folder_load_errors(what, path):`` the OSError that transformers and diffusers raise for a folder
    they cannot load (no weights file, an unreadable config) comes out as a FileNotFoundError naming ``what`` and
    the folder, which callers report as bad input. (A class whose ``__exit__`` returns None: type checkers then
    know that it suppresses nothing.)"""

    def __init__(self, what: str, path: str | os.PathLike):
        self.what, self.path = what, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, OSError):
            raise FileNotFoundError(f"could not load the {self.what} in {str(self.path)!r}: {error}") from None
