"""runtime stage of elastic_compile: decisions, stats, sampling, and exported runtimes (``load``)."""


def load(path, backend: str = "onnxruntime", **options):
    """Load an exported artifact as a :class:`~elastic_compile.runtime.artifact.Runtime` (see
    :func:`elastic_compile.runtime.artifact.load` for the options)."""
    from .artifact import load as _load

    return _load(path, backend, **options)
