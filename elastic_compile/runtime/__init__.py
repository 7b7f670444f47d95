"""runtime stage of elastic_compile: decisions, stats, sampling, exported runtimes (``load``) and whole-forward CUDA
graphs with routers deciding on the GPU (``capture_cuda_graph``)."""


def load(path, backend: str = "onnxruntime", **options):
    """Load an exported artifact as a :class:`~elastic_compile.runtime.artifact.Runtime` (see
    :func:`elastic_compile.runtime.artifact.load` for the options)."""
    from .artifact import load as _load

    return _load(path, backend, **options)


def capture_cuda_graph(model, example_inputs, **options):
    """Capture one forward of an elastic model as a CUDA graph whose routers decide on the GPU (see
    :func:`elastic_compile.runtime.cuda_graph.capture_cuda_graph`)."""
    from .cuda_graph import capture_cuda_graph as _capture

    return _capture(model, example_inputs, **options)
