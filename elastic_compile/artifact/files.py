"""Artifact manifests shared by ``save`` and ``export``: atomic JSON writes and checked reads.

Directories are written through :mod:`.commit` (staged, then renamed into place); reading a manifest first lets
:func:`.commit.recover` finish or undo a write that a killed process left half done.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ArtifactError
from .commit import recover
from .integrity import check_seal, seal


def write_json_atomic(path: Path, data: dict) -> dict:
    """Write ``data`` sealed with its own hash (see :mod:`.integrity`) to ``path`` via a temporary file and
    ``os.replace`` (readers see old or new, never half); returns what was written."""
    sealed = seal(data)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(sealed, indent=1, sort_keys=False))
    os.replace(tmp, path)
    return sealed


def read_manifest_json(file: Path, expected_format: str, written_by: str, remedy: str) -> dict:
    """The JSON manifest at ``file``; ArtifactError when it is missing, not a JSON object, of another format, or
    does not match its own hash."""
    recover(file.parent)
    if not file.is_file():
        raise ArtifactError(f"a directory containing {file.name}, written by {written_by}", f"{file.parent}",
                            f"Pass a directory written by {written_by} (an interrupted write leaves none).")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"valid JSON in {file}", f"{type(exc).__name__}: {exc}",
                            f"The artifact is corrupt; {remedy}.") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"a JSON object in {file}", f"a JSON {type(manifest).__name__}",
                            f"The artifact is corrupt; {remedy}.")
    if manifest.get("format") != expected_format:
        raise ArtifactError(f"format {expected_format} in {file}", f"{manifest.get('format')!r}",
                            f"Use the elastic_compile version that wrote it, or {remedy}.")
    check_seal(manifest, file, remedy)
    return manifest
