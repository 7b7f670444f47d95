"""Model definitions shipped with elastic_compile (architectures, not weights)."""
from .dit import DiT, DiTBlock, dit_config

__all__ = ["DiT", "DiTBlock", "dit_config"]
