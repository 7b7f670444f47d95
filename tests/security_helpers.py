"""Helpers for the security and property tests: tiny artifacts, edits that keep (or break) their hashes, a dead
process id, a time limit per case."""
from __future__ import annotations

import contextlib
import copy
import json
import signal
import subprocess
import sys
from pathlib import Path

import elastic_compile as ec
from elastic_compile.artifact.integrity import seal
from elastic_compile.artifact.manifest import hash_tree
from helpers import randomize_routers
from zoo import ARCHITECTURES


def saved_artifact(path: Path, seed: int = 2):
    """A transformed tiny DiT with random routers, saved at ``path``; returns (pristine base, inputs, model)."""
    base, inputs = ARCHITECTURES["reference_dit"](seed=0)
    model = ec.transform(copy.deepcopy(base), example_inputs=inputs)
    randomize_routers(model, seed=seed)
    ec.save(model, path)
    return base, inputs, model


def rewrite_manifest(root: Path, name: str, edit=None, *, rehash: bool = True, keep_seal: bool = False) -> dict:
    """Apply ``edit(manifest)`` (in place) to ``root/name`` and write it back, by default with its file hashes
    recomputed and sealed again: what a careful tamperer does, so the checks behind the hashes are what the
    test exercises."""
    file = root / name
    manifest = json.loads(file.read_text())
    if edit is not None:
        edit(manifest)
    if isinstance(manifest, dict) and rehash:
        manifest["files"] = hash_tree(root) if name == "manifest.json" else \
            {k: v for k, v in hash_tree(root).items() if k != name}
    if isinstance(manifest, dict) and not keep_seal:
        manifest = seal(manifest)
    file.write_text(json.dumps(manifest))
    return manifest


def dead_pid() -> int:
    """The id of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@contextlib.contextmanager
def time_limit(seconds: float):
    """TimeoutError when the body runs longer than ``seconds`` (a hang fails the test instead of the suite)."""
    def expired(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
