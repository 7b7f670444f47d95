"""export stage of elastic_compile: writes an artifact (per (block, bucket, batch size) static-shape ONNX graphs,
router graphs, the ops outside the blocks, the base model and a manifest) in the format of
:mod:`elastic_compile.artifact`; :func:`elastic_compile.serve.load` reads it back. The public
:func:`elastic_compile.export` (``deploy.py``) runs :func:`.exporter.export` with the runtime's check."""
