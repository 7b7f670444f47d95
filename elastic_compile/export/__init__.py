"""export stage of elastic_compile: per (block, bucket, batch size) static-shape ONNX graphs, router graphs,
the base model and a manifest; loaded back by :func:`elastic_compile.runtime.load`."""


def export(model, example_inputs, out_dir, buckets=None, dtype: str = "fp32", backend: str = "onnxruntime",
           batch_sizes=None, **options):
    """Export an elastic model; see :func:`elastic_compile.export.exporter.export`."""
    from .exporter import export as _export

    return _export(model, example_inputs, out_dir, buckets, dtype, backend, batch_sizes, **options)


__all__ = ["export"]
