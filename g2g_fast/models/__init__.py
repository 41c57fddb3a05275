"""Fast networks: same state-dict layout as `g2g_fast.reference`, hot paths through fused ops."""
from .funit import Generator

__all__ = ["Generator"]
