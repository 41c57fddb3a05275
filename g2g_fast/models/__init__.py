"""Fast networks: same state-dict layout as `g2g_fast.reference`, hot paths through fused ops."""
from .funit import Discriminator, Generator
from .naive import NaiveModel
from .patchgan import PatchDiscriminator

__all__ = ["Discriminator", "Generator", "NaiveModel", "PatchDiscriminator"]
