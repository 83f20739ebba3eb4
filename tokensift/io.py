"""Small shared helpers for writing outputs safely.

An output directory is filled under a temporary sibling name and swapped into place: the old directory is
first renamed aside, the new one renamed into its place, and only then is the old one deleted, so a crash at
any point leaves the old output or the new one (possibly both, one under a hidden ``.<name>.*`` name), never
neither. A directory is replaced only if it is empty or carries the marker file of the writer that made it
(``tokensift.json`` for an artifact, ``tokensift_backbone.json`` / ``tokensift_mllm.json`` for a trained
backbone), so pointing a writer at the wrong path never deletes someone else's files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_replaceable(out: str | os.PathLike, marker: str, what: str) -> None:
    """Raise unless ``out`` is absent, an empty directory, or a directory holding the file ``marker``.

    ``what`` names the output in the message (``"tokensift artifact"``, ``"trained backbone"``).
    """
    out = Path(out)
    if out.is_symlink():
        raise FileExistsError(
            f"{out} is a symbolic link; refusing to replace it with a {what}. Remove the link or choose another path."
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file, not a {what} directory; remove it or choose another path.")
    if (out / marker).is_file() or not any(out.iterdir()):
        return
    raise FileExistsError(
        f"{out} exists and is not a {what} (it has no {marker}), so it is not replaced: its files would be "
        f"deleted. Choose a new output path, or move or empty {out} yourself."
    )


@contextmanager
def atomic_directory(out: str | os.PathLike, marker: str, what: str = "tokensift output") -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out``, on error it vanishes.

    ``out`` may be absent, an empty directory, or a directory holding ``marker`` (an earlier output of the
    same writer); anything else is refused before and again after the body runs (see :func:`check_replaceable`).
    The body must write ``marker`` into the temporary directory.
    """
    out = Path(out)
    check_replaceable(out, marker, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _apply_umask(tmp)  # mkdtemp makes the folder private (0700); outputs get the usual permissions
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"the writer of {out} did not write its marker file {marker}; nothing was replaced.")
        check_replaceable(out, marker, what)  # something may have appeared there while the body ran
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is renamed aside first and deleted only afterwards."""
    if not out.exists():
        os.replace(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.rmdir(aside)  # only the unique name is wanted: a directory is renamed onto it next
    os.replace(out, aside)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(aside, out)  # put the old output back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _apply_umask(path: Path) -> None:
    """Give ``path`` the mode a plain ``mkdir`` would (read from /proc: ``os.umask`` would change it process-wide)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return  # no /proc: the folder stays private
    umask = next((int(line.split()[1], 8) for line in status.splitlines() if line.startswith("Umask:")), None)
    if umask is not None:
        os.chmod(path, 0o777 & ~umask)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of the file ``path`` to write; on success it is renamed over ``path`` (readers see
    the old file or the new one, never half of one), on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``path.write_text(text)`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)
