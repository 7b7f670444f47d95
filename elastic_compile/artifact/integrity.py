"""What makes every byte of an artifact checked before anything of it is used.

A manifest lists every file of its artifact with its sha256 (``files``) and carries the sha256 of its own
canonical JSON (``manifest_sha256``), so an edited hash, a deleted ``files`` entry or any other edit of the
manifest is caught as well as a changed, truncated, missing or added file. This is a check against corruption
and careless edits, not a signature: whoever can rewrite every file can rewrite the hashes too, which is why
nothing an artifact holds is ever run as code (see the README's "Security" section).

Every path a manifest names is checked to stay inside its artifact (relative, no ``..``, no link on the way).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import ArtifactError

SEAL = "manifest_sha256"
HASH_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def seal(manifest: dict) -> dict:
    """``manifest`` as JSON will read it back, with its own hash added (``manifest_sha256``)."""
    plain = json.loads(json.dumps(manifest, default=str))
    plain[SEAL] = hashlib.sha256(_canonical(plain)).hexdigest()
    return plain


def check_seal(manifest: dict, file: Path, remedy: str) -> None:
    """ArtifactError unless ``manifest`` (read from ``file``) carries the hash of its own content."""
    recorded = manifest.get(SEAL)
    if not isinstance(recorded, str):
        raise ArtifactError(f"a {SEAL} entry (the hash of the manifest itself) in {file}", "none",
                            f"The manifest was edited, or written by an older elastic_compile; {remedy}.")
    if hashlib.sha256(_canonical(manifest)).hexdigest() != recorded:
        raise ArtifactError(f"{file} to match its {SEAL} ({recorded[:12]}...)", "different content",
                            f"The manifest was edited or corrupted; {remedy}.")


def inside(root: Path, name: Any, what: str, manifest: Path) -> Path:
    """``root / name`` for a relative path ``name`` from a manifest that stays inside ``root``."""
    parts = name.split("/") if isinstance(name, str) else None
    if not name or parts is None or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"{what} as a relative path inside the artifact (in {manifest})", repr(name),
                            "The manifest is corrupt or was edited; write the artifact again.")
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise ArtifactError(f"{what} inside the artifact, not through a link", f"{path} is a link",
                                "Replace the link with the file itself, or write the artifact again.")
    return path


def check_files(root: Path, manifest: dict, manifest_name: str, remedy: str, unhashed: tuple[str, ...] = ()) -> None:
    """Every file under ``root`` is listed in ``manifest["files"]`` with its sha256 and matches it; nothing is
    missing or added (files under the ``unhashed`` folders excepted; links and other special files refused)."""
    file = root / manifest_name
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in listed.values()):
        raise ArtifactError(f"a 'files' table (relative path -> sha256) in {file}", f"{type(listed).__name__}",
                            f"The manifest was edited or is corrupt; {remedy}.")
    for name, digest in listed.items():
        path = inside(root, name, "a listed file", file)
        if not path.is_file():
            raise ArtifactError(f"{path}, listed in {file}", "it is missing", f"The artifact is incomplete; {remedy}.")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path} with sha256 {digest[:12]}... (as {file} records)", "different content",
                                f"The file was modified or corrupted; {remedy}.")
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] in unhashed or relative == manifest_name:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ArtifactError(f"only regular files and folders in {root}", f"{path} (a link or special file)",
                                f"Remove it; {remedy}.")
        if path.is_file() and relative not in listed:
            raise ArtifactError(f"only the files {file} lists in {root}", f"{path}, not listed",
                                f"Remove files you added to the artifact, or {remedy}.")


def load_tensors(path: Path) -> dict:
    """The tensors of a safetensors file (never a pickle); ArtifactError naming the file when it does not parse."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"a safetensors file at {path}", f"{type(exc).__name__}: {str(exc)[:200]}",
                            "The file is truncated or corrupt; write the artifact again.") from exc
