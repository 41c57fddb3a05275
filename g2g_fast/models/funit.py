"""The FUNIT generator with every instance norm / AdaIN fused (SPEC §2, §7).

Same constructor, module tree and state-dict keys as `g2g_fast.reference.funit.Generator`, so
parity is `load_state_dict(strict=True)` plus a compare. What changes is only the norm-bearing
blocks: `conv -> adain(act)` is one fused pass instead of norm, affine and activation, and a
ResBlock's skip add is fused into its second norm (`adain(..., residual=x)`). Blocks without a
norm (class encoder, MLP, the final tanh conv) are the reference modules themselves.

No `.contiguous()` anywhere: the fused op reads NCHW or channels_last through strides and returns
the input's format, so a channels_last model stays channels_last end to end.

`subpixel=True` (off by default until a GPU measurement shows it faster, issue 5) runs the
decoder's nearest-upsample + 5x5 conv as `kernels.upsample_conv` (four 3x3 phase convolutions,
exact, 2.8x fewer MACs); the nn.Upsample modules stay in place (no parameters, same keys) and are
skipped.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from g2g_fast.ops import adain, upsample_conv
from g2g_fast.reference import funit as ref

__all__ = ["Generator"]


class Conv2dBlock(ref.Conv2dBlock):
    """reflect pad -> conv -> one fused adain (instance stats, affine, activation, residual).

    Only the generator's post-activation blocks with a norm use this class; `impl` is set by
    `Generator.impl` and passed to every call so tests can force "triton" or "ref".
    """

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        assert self.norm_kind in ("in", "adain") and not self.act_first, "use ref.Conv2dBlock"
        self.impl = impl

    def forward(self, x, style=None, residual=None, upsample=False):
        """`upsample=True`: x is the low-resolution map and the block computes
        conv(reflect_pad(nearest_up2(x))) by the sub-pixel rewrite."""
        if upsample:
            y = upsample_conv(x, self.conv.weight, self.conv.bias, impl="subpixel")
        else:
            if self.padding:
                x = F.pad(x, (self.padding,) * 4, mode="reflect")  # keeps channels_last
            y = self.conv(x)
        weight, bias = style if self.norm_kind == "adain" else (None, None)
        return adain(y, weight, bias, act=self.act, residual=residual, impl=self.impl)


class ResBlock(ref.ResBlock):
    """conv3x3 -> adain(relu) -> conv3x3 -> adain(+ x): the skip add costs no extra pass."""

    def __init__(self, dim, norm, impl):
        nn.Module.__init__(self)
        self.model = nn.Sequential(
            Conv2dBlock(dim, dim, 3, 1, 1, norm=norm, act="relu", impl=impl),
            Conv2dBlock(dim, dim, 3, 1, 1, norm=norm, act="none", impl=impl),
        )

    def forward(self, x, styles=(None, None)):
        return self.model[1](self.model[0](x, styles[0]), styles[1], residual=x)


class ResBlocks(ref.ResBlocks):
    """forward (per-block style slicing) is the reference's; only the blocks are fast."""

    def __init__(self, n, dim, norm, impl):
        nn.Module.__init__(self)
        self.model = nn.Sequential(*[ResBlock(dim, norm, impl) for _ in range(n)])


class ContentEncoder(ref.ContentEncoder):
    """The reference layer list (same indices, so same keys) built from fused blocks."""

    def __init__(self, downs, n_res, dim, impl, code_dim=0):
        nn.Module.__init__(self)
        layers = [Conv2dBlock(3, dim, 7, 1, 3, norm="in", act="relu", impl=impl)]
        for _ in range(downs):
            layers.append(Conv2dBlock(dim, 2 * dim, 4, 2, 1, norm="in", act="relu", impl=impl))
            dim *= 2
        layers.append(ResBlocks(n_res, dim, "in", impl))
        if code_dim:  # the linear 1x1 bottleneck: no norm, nothing to fuse
            layers.append(nn.Conv2d(dim, code_dim, 1))
        self.model = nn.Sequential(*layers)
        self.output_dim = dim
        self.code_dim = code_dim or dim


class Decoder(ref.Decoder):
    """The [bias | weight] slicing of the MLP output is the reference's; forward is too unless
    `subpixel` fuses each nn.Upsample into the conv block after it."""

    def __init__(self, ups, n_res, dim, impl, subpixel=False, code_dim=0):
        nn.Module.__init__(self)
        self.subpixel = subpixel
        if code_dim:  # as the reference: registered before `model`, so the same init order
            self.content_in = nn.Conv2d(code_dim, dim, 1)
        layers = [ResBlocks(n_res, dim, "adain", impl)]
        for _ in range(ups):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       Conv2dBlock(dim, dim // 2, 5, 1, 2, norm="in", act="relu", impl=impl)]
            dim //= 2
        layers.append(ref.Conv2dBlock(dim, 3, 7, 1, 3, act="tanh"))  # no norm: nothing to fuse
        self.model = nn.Sequential(*layers)

    def forward(self, content, adain_params):
        if not self.subpixel:
            return super().forward(content, adain_params)
        x = self.model[0](self.expand(content), self.split_adain_params(adain_params))
        upsample = False
        for layer in self.model[1:]:
            if isinstance(layer, nn.Upsample):
                upsample = True  # done by the next block
                continue
            x = layer(x, upsample=True) if upsample else layer(x)
            upsample = False
        return x


class Generator(ref.Generator):
    """FUNIT's FewShotGen with fused norms; methods (encode_content, encode_class, decode,
    forward) are the reference's. `impl` ("auto" | "triton" | "ref") goes to every adain call
    and may be changed after construction (`gen.impl = "ref"`), as may `gen.dec.subpixel`.
    """

    def __init__(self, nf=64, n_res_blks=2, nf_mlp=256, latent_dim=64, n_mlp_blks=3,
                 n_downs_content=3, n_downs_class=4, content_dim=0, class_encoder: nn.Module | None = None,
                 impl: str = "auto", subpixel: bool = False):
        nn.Module.__init__(self)
        # Same construction and init order as the reference, so a seed gives the same weights.
        self.enc_class_model = class_encoder or ref.ClassEncoder(n_downs_class, nf, latent_dim)
        self.enc_content = ContentEncoder(n_downs_content, n_res_blks, nf, impl, content_dim)
        self.dec = Decoder(n_downs_content, n_res_blks, self.enc_content.output_dim, impl, subpixel, content_dim)
        self.mlp = ref.MLP(self.enc_class_model.out_dim, self.dec.num_adain_params(), nf_mlp, n_mlp_blks)
        for part in (self.enc_content, self.dec, self.mlp) + (() if class_encoder else (self.enc_class_model,)):
            ref.init_kaiming(part)
        self.impl = impl

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        # Each fused block holds its own copy (so enc_content / dec also work standalone).
        for m in self.modules():
            if isinstance(m, Conv2dBlock):
                m.impl = value
        self._impl = value
