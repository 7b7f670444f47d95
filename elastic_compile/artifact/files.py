"""Artifact files shared by ``save`` and ``export``: atomic directory and JSON writes, checked manifest reads.

A directory is written into a temporary sibling (same parent, hence same filesystem) and renamed into place only
when complete, so an interrupted write leaves either the previous directory untouched or nothing at the target.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import ArtifactError


@contextmanager
def staging_directory(target: str | os.PathLike):
    """Yield a fresh temporary directory beside ``target``; on normal exit it replaces ``target`` (atomic rename,
    the previous directory is removed afterwards), on an exception it is deleted and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_directory(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and restored on failure."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (readers see old or new, never half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)


def read_manifest_json(file: Path, expected_format: str, written_by: str, remedy: str) -> dict:
    """The JSON manifest at ``file``; ArtifactError when it is missing, not JSON, or of another format."""
    if not file.is_file():
        raise ArtifactError(f"a directory containing {file.name}, written by {written_by}", f"{file.parent}",
                            f"Pass a directory written by {written_by} (an interrupted write leaves none).")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"valid JSON in {file}", str(exc), f"The artifact is corrupt; {remedy}.") from exc
    if manifest.get("format") != expected_format:
        raise ArtifactError(f"format {expected_format}", f"{manifest.get('format')!r}",
                            f"Use the elastic_compile version that wrote it, or {remedy}.")
    return manifest
