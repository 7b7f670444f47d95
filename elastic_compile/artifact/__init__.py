"""The on-disk format of an export, what the exporter (``export/``) writes and the runtime (``serve/``) reads.

:mod:`.files` (atomic directory and JSON writes), :mod:`.manifest` (``manifest.json``, file hashes, tool versions),
:mod:`.layout` (how one block call maps to flat graph tensors), :mod:`.graphs` (how graphs take PyTorch values;
the forward as a program of steps) and :mod:`.base` (the base model inside an export). Neither side imports the
other: both import this package.
"""
