"""Writing an artifact directory so that no interruption loses the previous one, leaves half of a new one in its
place, or deletes anything elastic_compile did not write.

A write to ``target`` goes through these steps, each a rename inside ``target``'s parent (atomic on one
filesystem):

1. ``.<name>.staging-<owner>-<random>``: a fresh directory the caller fills (its manifest last) and checks;
2. renamed ``.<name>.ready-<owner>-<random>``: complete and checked;
3. an existing ``target`` renamed ``.<name>.old-<owner>-<random>``;
4. the ready directory renamed ``target``;
5. the old directory deleted.

``<owner>`` names the writing process (a hash of the host name and the pid). A process killed between two steps
leaves its directories behind; :func:`recover`, which every later load and write of ``target`` runs first,
finishes or undoes what the dead writer left: with no ``target``, a ready directory becomes it (the write had
passed every check) or else an old one is put back; staging directories, ready directories that lost to an
existing ``target`` and what remains of old ones are deleted. Directories of a live process, or of another
host (whose processes cannot be checked from here), are left alone.

Before writing, :func:`check_destination` refuses a ``target`` that is a regular file or a link (never
touched, even with ``overwrite``), and a non-empty directory that is not a previous artifact of this toolkit
unless the caller passes ``overwrite=True``: so a user's files are deleted only when the user asked for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from ..errors import DestinationError

KINDS = ("staging", "ready", "old")
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]

#: Called with the name of each step of a write ("staged", "ready", "moved_aside", "swapped", "cleaned") once
#: it is done; the tests set it to kill the process there.
step_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if step_hook is not None:
        step_hook(name)


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{HOST}-{os.getpid()}-"


def _leftovers(target: Path) -> list[tuple[str, Path, bool]]:
    """``(kind, path, owner alive)`` of every directory a write of ``target`` left beside it."""
    found = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return found
    for path in siblings:
        for kind in KINDS:
            head = f".{target.name}.{kind}-"
            if not path.name.startswith(head):
                continue
            host, _, rest = path.name[len(head):].partition("-")
            pid, _, _ = rest.partition("-")
            if pid.isdigit() and path.is_dir() and not path.is_symlink():
                found.append((kind, path, _alive(host, int(pid))))
    return found


def _alive(host: str, pid: int) -> bool:
    """Whether process ``pid`` of ``host`` may still be writing (unknown hosts count as alive)."""
    if host != HOST or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def recover(target: str | os.PathLike) -> None:
    """Finish or undo the writes of ``target`` that a dead process left half done (see the module docstring).
    Failures to clean up (a read-only parent) are ignored: loading still works, the next write retries."""
    target = Path(target)
    dead = [(kind, path) for kind, path, alive in _leftovers(target) if not alive]
    if not dead:
        return
    by_age = sorted(dead, key=lambda item: item[1].stat().st_mtime if item[1].exists() else 0, reverse=True)
    for wanted in ("ready", "old"):  # a completed write first, else the previous artifact
        if target.exists() or target.is_symlink():
            break
        for kind, path in by_age:
            if kind == wanted:
                try:
                    os.rename(path, target)
                    break
                except OSError:
                    continue
    for _, path in dead:
        if path.exists():
            _remove(path)


def check_destination(target: Path, overwrite: bool, previous: Callable[[Path], bool]) -> None:
    """Refuse to replace a regular file or link, or a non-empty directory ``previous`` does not recognise as a
    previous artifact (unless ``overwrite``)."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        what = "a link" if target.is_symlink() else "a file"
        raise DestinationError(f"a directory (or nothing) at {target}", what,
                               "elastic_compile never replaces a file or link: choose another path, or move it away.")
    if not target.is_dir() or overwrite:
        return
    entries = sorted(p.name for p in target.iterdir())
    if entries and not previous(target):
        raise DestinationError(f"an empty directory or a previous elastic_compile artifact at {target}",
                               f"a directory holding files elastic_compile did not write ({', '.join(entries[:3])}"
                               f"{', ...' if len(entries) > 3 else ''})",
                               "Choose another path, or pass overwrite=True (--overwrite) to replace what it holds.")


def written_by_us(directory: Path, manifest_name: str, expected_format: str, known: Iterable[str] = (),
                  unhashed: Iterable[str] = ()) -> bool:
    """Whether ``directory`` is an artifact of ``expected_format`` holding only files its manifest lists (or, for
    a manifest without a file list, only the ``known`` names), plus files under the ``unhashed`` folders."""
    try:
        manifest = json.loads((directory / manifest_name).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        return False
    listed = manifest.get("files")
    ours = set(listed) if isinstance(listed, dict) else set(known)
    ours.add(manifest_name)
    folders = tuple(f"{name}/" for name in unhashed)
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            return False
        if path.is_file() and relative not in ours and not relative.startswith(folders):
            return False
    return True


def _mkdir_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {target.parent}")
    except OSError as exc:
        raise DestinationError(f"a writable folder for {target}", f"{type(exc).__name__}: {exc}",
                               "Choose an output path in a folder you can write to.") from exc


@contextmanager
def staging_directory(target: str | os.PathLike, *, overwrite: bool = False,
                      previous: Callable[[Path], bool] = lambda path: False):
    """Yield a fresh staging directory beside ``target``; on normal exit it replaces ``target`` (steps above), on
    an exception it is deleted and ``target`` is left as it was. ``previous(target)`` says whether an existing
    non-empty ``target`` is an artifact this toolkit wrote (replaced without ``overwrite``)."""
    target = Path(target)
    _mkdir_parent(target)
    recover(target)
    check_destination(target, overwrite, previous)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(target, "staging"), dir=target.parent))
    try:
        yield staging
        _step("staged")
        commit(staging, target)
    except BaseException:
        _remove(staging)
        raise


def commit(staging: Path, target: Path) -> None:
    """Steps 2-5 of the module docstring: ``staging`` (complete) becomes ``target``."""
    ready = staging.with_name(staging.name.replace(".staging-", ".ready-", 1))
    os.rename(staging, ready)
    old = None
    try:
        _step("ready")
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=_prefix(target, "old"), dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
            _step("moved_aside")
        os.rename(ready, target)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)
        _remove(ready)
        raise
    try:
        _step("swapped")
    finally:  # the new artifact is in place: the previous one goes, whatever happens next
        if old is not None:
            _remove(old)
    _step("cleaned")
