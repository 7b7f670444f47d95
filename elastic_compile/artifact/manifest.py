"""``manifest.json`` of an exported artifact: file hashes, tool versions, and the checked read.

Pure Python (no onnx / onnxruntime / TensorRT imports), so it is unit-tested everywhere.

An export directory is written into a staging directory (see :mod:`.commit`) and renamed into place only after
every file was written, checked and compared with PyTorch; ``manifest.json`` (written last) lists every file with
its sha256 and carries the hash of its own content (see :mod:`.integrity`). :func:`read_manifest` refuses a
directory whose manifest was edited, whose files do not match their hashes, or whose values make no sense for
this reader (see :mod:`.validate`).
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from ..version import __version__
from .commit import written_by_us
from .files import read_manifest_json, write_json_atomic
from .integrity import check_files, sha256_file
from .validate import validate_export

FORMAT = "elastic_compile.export/1"
MANIFEST = "manifest.json"
REMEDY = "export again"

#: Folders whose content is not hashed: the TensorRT engine cache validates its own entries and is rewritten
#: on other GPUs / TensorRT versions.
UNHASHED = ("engines",)


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (except the manifest and UNHASHED folders), by relative path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
                   and p.relative_to(root).parts[0] not in UNHASHED)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def tool_versions(*packages: str) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "diffusers", "tensorrt", "elastic_compile") + packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "elastic_compile":
                versions[name] = __version__
    return versions


def finalize(root: Path, manifest: dict) -> dict:
    """Add file hashes to ``manifest`` and write ``root/manifest.json`` (the last file of an export), sealed."""
    manifest = dict(manifest)
    manifest["files"] = hash_tree(root)
    return write_json_atomic(root / MANIFEST, manifest)


def is_export(directory: Path) -> bool:
    """Whether ``directory`` is an export this toolkit wrote, holding nothing else (safe to replace)."""
    return written_by_us(directory, MANIFEST, FORMAT, unhashed=UNHASHED)


def read_manifest(root: str | os.PathLike, *, check_hashes: bool = True) -> dict:
    """The manifest of an export directory. ArtifactError when it is missing, of another format, edited (its own
    hash), holds values this reader cannot use, or (``check_hashes``) when a file is missing, added or differs
    from its recorded sha256."""
    root = Path(root)
    manifest = read_manifest_json(root / MANIFEST, FORMAT, "elastic_compile.export", REMEDY)
    if check_hashes:
        check_files(root, manifest, MANIFEST, REMEDY, UNHASHED)
    validate_export(manifest, root / MANIFEST)
    return manifest
