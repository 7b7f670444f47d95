"""``manifest.json`` of an exported artifact, file hashes, tool versions and the atomic directory swap.

Pure Python (no onnx / onnxruntime / TensorRT imports), so it is unit-tested everywhere.

An export directory is written into a temporary sibling directory (same parent, hence same filesystem) and
renamed into place only after every file was written, checked and compared with PyTorch, and
``manifest.json`` (written last) lists every file with its sha256. So an interrupted export leaves either the
previous directory untouched or nothing at ``out_dir``; a staging directory never has a manifest until it is
complete, and :func:`read_manifest` refuses a directory whose files do not match their hashes.
"""
from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

from ..errors import ArtifactError
from ..version import __version__
from .files import read_manifest_json, write_json_atomic

FORMAT = "elastic_compile.export/1"
MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: Folders whose content is not hashed: the TensorRT engine cache validates its own entries and is rewritten
#: on other GPUs / TensorRT versions.
UNHASHED = ("engines",)


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (except the manifest and UNHASHED folders), by relative path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
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
    """Add file hashes to ``manifest`` and write ``root/manifest.json`` (the last file of an export)."""
    manifest = dict(manifest)
    manifest["files"] = hash_tree(root)
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | os.PathLike, *, check_hashes: bool = True) -> dict:
    """The manifest of an export directory; ArtifactError when it is missing, of another format, or when a
    listed file is missing or differs from its recorded sha256 (``check_hashes``)."""
    root = Path(root)
    manifest = read_manifest_json(root / MANIFEST, FORMAT, "elastic_compile.export", "export again")
    if check_hashes:
        for name, digest in manifest.get("files", {}).items():
            file = root / name
            if not file.is_file():
                raise ArtifactError(f"{name} listed in the manifest", "it is missing", "Export again.")
            if sha256_file(file) != digest:
                raise ArtifactError(f"{name} with sha256 {digest[:12]}...", "different content",
                                    "The artifact was modified or corrupted; export again.")
    return manifest
