"""``python -m elastic_compile.cli ...`` (e.g. under ``torchrun --nproc_per_node N -m elastic_compile.cli train``)."""
import sys

from . import main

sys.exit(main())
