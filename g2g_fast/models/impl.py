"""`impl` of a fast network: one attribute that reaches every fused op inside it."""
from __future__ import annotations


class Switchable:
    """Mixin for a fast network (an nn.Module): `net.impl = "auto" | "triton" | "ref"` sets the
    `impl` of every submodule that has one (each block keeps its own copy, so a part such as
    `gen.enc_content` also works on its own). Tests force "ref" where the Triton interpreter would
    be slow and "triton" where the kernels are what is tested."""

    @property
    def impl(self) -> str:
        return self.__dict__.get("_impl", "auto")

    @impl.setter
    def impl(self, value: str) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "impl"):
                m.impl = value
        self.__dict__["_impl"] = value
