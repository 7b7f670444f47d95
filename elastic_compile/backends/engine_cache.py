"""TensorRT engine cache: keys, entry format and validation. Pure Python (no TensorRT, no CUDA), unit-tested.

An engine is only valid for the exact ONNX graph and weights it was built from, the TensorRT version that built
it, the GPU model / compute capability it was tuned on, and the build flags. :class:`EngineKey` holds all of
them; its :meth:`~EngineKey.digest` names the cache entry ``<digest>.engine``.

Entry format (one file, written atomically via a temporary file and ``os.replace``)::

    MAGIC (8 bytes) | header length (uint32 LE) | header (UTF-8 JSON) | payload (serialized engine)

The header holds the full key, the payload size and its sha256. :meth:`EngineCache.lookup` returns a payload
only when the magic, the header, the key (field by field), the size and the hash all match; anything else
(bad header, truncated file, an entry of another key renamed into place, flipped bytes) is reported, the entry
is deleted, and the caller rebuilds. :meth:`EngineCache.get_or_build` also rebuilds when TensorRT refuses to
deserialize a payload that passed those checks (``deserialize`` returned None). A stale or corrupt engine is
therefore never run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import EngineCacheError

logger = logging.getLogger("elastic_compile")

MAGIC = b"ECTRTENG"
ENTRY_VERSION = 1
_LENGTH = struct.Struct("<I")
MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. ``flags``: build options as sorted ``(name, value)`` string pairs."""

    onnx_sha256: str
    weights_sha256: tuple[str, ...]
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    flags: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def make(cls, onnx_sha256: str, weights_sha256, tensorrt_version: str, gpu_name: str, compute_capability,
             flags: dict[str, Any]) -> "EngineKey":
        capability = ".".join(str(c) for c in compute_capability) if isinstance(compute_capability, (tuple, list)) \
            else str(compute_capability)
        return cls(onnx_sha256, tuple(sorted(weights_sha256)), str(tensorrt_version), str(gpu_name), capability,
                   tuple(sorted((str(k), json.dumps(v, sort_keys=True)) for k, v in flags.items())))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["weights_sha256"] = list(self.weights_sha256)
        data["flags"] = [list(pair) for pair in self.flags]
        return data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def encode_entry(key: EngineKey, payload: bytes) -> bytes:
    header = json.dumps({"version": ENTRY_VERSION, "key": key.to_dict(), "size": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}, sort_keys=True).encode()
    return MAGIC + _LENGTH.pack(len(header)) + header + payload


def decode_entry(data: bytes, key: EngineKey) -> bytes:
    """The payload of an entry for ``key``; EngineCacheError saying why when the entry is not valid for it."""
    prefix = len(MAGIC) + _LENGTH.size
    if len(data) < prefix or data[:len(MAGIC)] != MAGIC:
        raise EngineCacheError("an engine cache entry starting with the elastic_compile header", "a bad header",
                               "The entry is rebuilt.")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if length > MAX_HEADER or len(data) < prefix + length:
        raise EngineCacheError("a complete entry header", "a truncated or oversized header", "The entry is rebuilt.")
    try:
        header = json.loads(data[prefix:prefix + length].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineCacheError("a JSON entry header", f"unreadable ({exc})", "The entry is rebuilt.") from exc
    if header.get("version") != ENTRY_VERSION:
        raise EngineCacheError(f"entry format {ENTRY_VERSION}", f"{header.get('version')!r}", "The entry is rebuilt.")
    if header.get("key") != key.to_dict():
        stored = header.get("key") or {}
        differing = sorted(k for k in key.to_dict() if stored.get(k) != key.to_dict()[k])
        raise EngineCacheError("an engine built for this key", f"one built for another key (differs in {differing})",
                               "The entry is rebuilt.")
    payload = data[prefix + length:]
    if len(payload) != header.get("size"):
        raise EngineCacheError(f"a {header.get('size')}-byte engine", f"{len(payload)} bytes (truncated file?)",
                               "The entry is rebuilt.")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise EngineCacheError("an engine matching its recorded sha256", "different bytes (corrupt file)",
                               "The entry is rebuilt.")
    return payload


class EngineCache:
    """A directory of engine entries (``<key digest>.engine``) plus a shared TensorRT timing cache file."""

    TIMING_CACHE = "timing.cache"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.events: list[tuple[str, str]] = []   # (digest, "hit" | "built" | "rebuilt: <why>")

    def path(self, key: EngineKey) -> Path:
        return self.directory / f"{key.digest()}.engine"

    def lookup(self, key: EngineKey) -> tuple[bytes | None, str | None]:
        """``(payload, None)`` on a valid entry, ``(None, None)`` when there is none, ``(None, why)`` when the entry
        was invalid (it is deleted)."""
        path = self.path(key)
        if not path.is_file():
            return None, None
        try:
            return decode_entry(path.read_bytes(), key), None
        except EngineCacheError as exc:
            self.invalidate(key)
            return None, exc.found

    def store(self, key: EngineKey, payload: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(encode_entry(key, payload))
        os.replace(tmp, path)
        return path

    def invalidate(self, key: EngineKey) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes], deserialize: Callable[[bytes], Any]):
        """The deserialized engine for ``key``: from a valid cache entry, else built (and stored). A payload that
        ``deserialize`` rejects (returns None) is dropped and rebuilt once; a fresh build that is rejected raises."""
        payload, why = self.lookup(key)
        if payload is not None:
            engine = deserialize(payload)
            if engine is not None:
                self.events.append((key.digest(), "hit"))
                return engine
            self.invalidate(key)
            why = "TensorRT could not deserialize it"
        payload = build()
        if not payload:
            raise EngineCacheError("a serialized engine from the builder", "nothing (the build failed)",
                                   "See the TensorRT log above.")
        self.store(key, bytes(payload))
        engine = deserialize(bytes(payload))
        if engine is None:
            self.invalidate(key)
            raise EngineCacheError("a freshly built engine that deserializes", "None from deserialize_cuda_engine",
                                   "Check the TensorRT installation (versions of libnvinfer and the bindings).")
        self.events.append((key.digest(), "built" if why is None else f"rebuilt: {why}"))
        if why is not None:
            logger.warning("elastic_compile: rebuilt TensorRT engine %s (%s)", key.digest()[:12], why)
        return engine

    # timing cache ------------------------------------------------------------------------------------------
    def read_timing_cache(self) -> bytes:
        path = self.directory / self.TIMING_CACHE
        return path.read_bytes() if path.is_file() else b""

    def write_timing_cache(self, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / self.TIMING_CACHE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, path)
