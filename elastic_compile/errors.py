"""Typed errors a user of elastic_compile can hit.

Every error says what was expected, what was found, and what to do about it. All derive from
:class:`ElasticCompileError`, so ``except elastic_compile.errors.ElasticCompileError`` catches them all.
"""
from __future__ import annotations


class ElasticCompileError(Exception):
    """Base class of every error raised on purpose by elastic_compile."""

    def __init__(self, expected: str, found: str, fix: str):
        self.expected, self.found, self.fix = expected, found, fix
        super().__init__(f"expected {expected}; found {found}. {fix}")


class ConfigError(ElasticCompileError, ValueError):
    """A configuration value (ElasticConfig, force(), train options...) is out of range."""


class CaptureError(ElasticCompileError):
    """The model could not be run or exported with the example inputs given."""


class NoTransformerBlocksError(ElasticCompileError):
    """The model contains nothing that looks like a repeated residual transformer block."""


class NotElasticError(ElasticCompileError):
    """An elastic_compile function was given a model that ``transform`` has not rewritten."""


class AlreadyElasticError(ElasticCompileError):
    """``transform`` or ``load`` was given a model that is already elastic."""


class ModelMismatchError(ElasticCompileError):
    """A saved artifact does not fit the model it is being applied to."""


class ArtifactError(ElasticCompileError):
    """A saved artifact is missing, incomplete or corrupt."""


class FlopProfileError(ElasticCompileError):
    """FLOPs of a forward could not be measured (needed by ``stats``)."""


class BackendUnavailableError(ElasticCompileError):
    """An optional backend (TensorRT, CUDA, ...) is not installed or has no device here."""


class DenoiserError(ElasticCompileError):
    """A denoiser given to the sampler returned something the sampler cannot use (wrong type or shape)."""


class ExportError(ElasticCompileError):
    """An export could not be produced or did not reproduce the PyTorch model (nothing was written)."""


class UnsupportedComplexOpError(ExportError):
    """The complex-to-real rewrite met a complex-valued operation it does not know how to lower."""


class InputMismatchError(ElasticCompileError):
    """A block (of an exported runtime, or its router) was called with inputs it cannot take: shapes its
    static-shape graphs were not exported for, or rows that match neither the batch nor 1."""


class BucketNotExportedError(ElasticCompileError):
    """A plan asked for a width bucket (or block) that the export did not include."""


class EngineCacheError(ElasticCompileError):
    """A cached TensorRT engine is missing, corrupt or was built for another key (it is rebuilt, never run)."""


class DestinationError(ElasticCompileError):
    """An output path holds something that ``save`` / ``export`` will not replace: a regular file, a link, or a
    non-empty directory that is not a previous artifact of elastic_compile (unless ``overwrite=True``)."""
