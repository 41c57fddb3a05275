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

import torch
import torch.nn as nn
import torch.nn.functional as F

from g2g_fast.ops import adain, reflect_pad, upsample_conv
from g2g_fast.reference import funit as ref
from g2g_fast.reference import funit_dis as ref_dis
from g2g_fast.reference.ops import memory_format_of, pixel_rows

from .impl import Switchable

__all__ = ["Generator", "Discriminator"]


class PlainConv2dBlock(ref.Conv2dBlock):
    """A block without a norm ([act] -> pad -> conv -> [act]: the class encoder, the decoder's
    last conv, D) with its reflect padding by `kernels.reflect_pad`: aten's CUDA reflection_pad2d
    writes NCHW and accumulates its backward with atomics; this one keeps channels_last, its
    backward is a gather and it has a double backward (D's R1)."""

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        assert self.norm_kind == "none", "use Conv2dBlock"
        self.impl = impl

    def pad(self, x):
        return reflect_pad(x, self.padding, impl=self.impl)


class ReflectPad2d(nn.Module):
    """nn.ReflectionPad2d by `kernels.reflect_pad` (D's pad before each average pool)."""

    def __init__(self, padding: int, impl: str = "auto"):
        super().__init__()
        self.padding, self.impl = padding, impl

    def forward(self, x):
        return reflect_pad(x, self.padding, impl=self.impl)


class AvgPool2d(nn.AvgPool2d):
    """nn.AvgPool2d (no padding) whose gradient is an op of the output gradient alone.

    aten's double backward of avg_pool2d (D's R1) also returns a zero "gradient" for the pooled
    input, allocated NCHW, and adds it in; the pool is linear, so here the backward is
    avg_pool2d_backward as a function of the gradient only, and its own backward is the pool
    again. Same values; the memory format of the input throughout."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        if padding or ceil_mode or not count_include_pad or divisor_override is not None:
            raise ValueError("AvgPool2d: only padding 0, ceil_mode False, count_include_pad True and no "
                             "divisor_override (what FUNIT's discriminator uses)")
        super().__init__(kernel_size, stride)

    def forward(self, x):
        return _AvgPool.apply(x, self.kernel_size, self.stride)


class _AvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride):
        ctx.meta = x.shape, x.device, memory_format_of(x), kernel_size, stride
        return F.avg_pool2d(x, kernel_size, stride)

    @staticmethod
    def backward(ctx, grad):
        return _AvgPoolGrad.apply(grad, ctx.meta), None, None


class _AvgPoolGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, meta):
        shape, device, fmt, ctx.kernel_size, ctx.stride = meta
        like = torch.empty(shape, dtype=grad.dtype, device=device, memory_format=fmt)  # sizes only
        return torch.ops.aten.avg_pool2d_backward(grad, like, ctx.kernel_size, ctx.stride, 0, False, True, None)

    @staticmethod
    def backward(ctx, grad_grad):
        return F.avg_pool2d(grad_grad, ctx.kernel_size, ctx.stride), None


class GlobalAvgPool(nn.Module):
    """nn.AdaptiveAvgPool2d(1), averaged in fp32 over the NHWC view of a channels_last input.

    aten turns a 1x1 adaptive pool into a mean over H, W on every device; the mean's backward
    expands the (B, C) gradient and writes it NCHW. Over `pixel_rows`' view the same expansion
    comes out channels_last. fp32 accumulation and output: a statistic is reduced in fp32 (the 1x1 conv
    after it casts it to its autocast dtype). The same mean as COCO-FUNIT's content pool (`global_mean`)."""

    def __init__(self, output_size: int = 1):
        super().__init__()
        if output_size != 1:
            raise ValueError(f"GlobalAvgPool: only output size 1, got {output_size}")

    def forward(self, x):
        return global_mean(x)[:, :, None, None]


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """`ref.global_mean` (fp32 mean over pixels, (B, C)) over `pixel_rows`' view of a channels_last
    input, so that its backward writes a channels_last gradient."""
    dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype  # (float64 stays)
    rows = pixel_rows(x)
    return rows.mean(1, dtype=dtype) if rows is not None else x.mean((2, 3), dtype=dtype)


class ContentConditioning(ref.ContentConditioning):
    """COCO-FUNIT's conditioning (the reference's MLPs and product) with the content code's pool
    keeping channels_last in its backward: the content code's gradient from it adds to the
    decoder's without an NCHW tensor."""
    pool = staticmethod(global_mean)


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
                x = reflect_pad(x, self.padding, impl=self.impl)  # keeps channels_last
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

    def __init__(self, ups, n_res, dim, impl, subpixel=False, code_dim=0, norm="in"):
        nn.Module.__init__(self)
        self.subpixel, self.norm_kind = subpixel, norm
        if code_dim:  # as the reference: registered before `model`, so the same init order
            self.content_in = nn.Conv2d(code_dim, dim, 1)
        layers = [ResBlocks(n_res, dim, "adain", impl)]
        for _ in range(ups):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       Conv2dBlock(dim, dim // 2, 5, 1, 2, norm="in", act="relu", impl=impl) if norm == "in"
                       else PlainConv2dBlock(dim, dim // 2, 5, 1, 2, act="relu", impl=impl)]
            dim //= 2
        layers.append(PlainConv2dBlock(dim, 3, 7, 1, 3, act="tanh", impl=impl))  # no norm: nothing to fuse
        self.model = nn.Sequential(*layers)

    def forward(self, content, adain_params):
        if not self.subpixel:
            return super().forward(content, adain_params)
        x = self.model[0](self.expand(content), self.split_adain_params(adain_params))
        upsample = False
        for layer in self.model[1:]:
            if isinstance(layer, nn.Upsample) and self.norm_kind == "in":
                upsample = True  # done by the next block (a block without norm keeps its Upsample)
                continue
            x = layer(x, upsample=True) if upsample else layer(x)
            upsample = False
        return x


class Generator(Switchable, ref.Generator):
    """FUNIT's FewShotGen with fused norms; methods (encode_content, encode_class, decode,
    forward) are the reference's, and so is COCO-FUNIT's conditioning (`coco_bias_dim`) but for its
    pool. `impl` ("auto" | "triton" | "ref") goes to every adain call and may be changed after
    construction (`gen.impl = "ref"`), as may `gen.dec.subpixel`.
    """

    conditioning_class = ContentConditioning

    def __init__(self, nf=64, n_res_blks=2, nf_mlp=256, latent_dim=64, n_mlp_blks=3,
                 n_downs_content=3, n_downs_class=4, content_dim=0, class_encoder: nn.Module | None = None,
                 coco_bias_dim=0, dec_norm="in", impl: str = "auto", subpixel: bool = False):
        nn.Module.__init__(self)
        # Same construction and init order as the reference, so a seed gives the same weights.
        self.enc_class_model = class_encoder or ClassEncoder(n_downs_class, nf, latent_dim)
        self.enc_content = ContentEncoder(n_downs_content, n_res_blks, nf, impl, content_dim)
        self.dec = Decoder(n_downs_content, n_res_blks, self.enc_content.output_dim, impl, subpixel, content_dim,
                           dec_norm)
        self.mlp = ref.MLP(self.enc_class_model.out_dim, self.dec.num_adain_params(), nf_mlp, n_mlp_blks)
        for part in (self.enc_content, self.dec, self.mlp) + (() if class_encoder else (self.enc_class_model,)):
            ref.init_kaiming(part)
        self.coco = self.conditioning(coco_bias_dim, nf_mlp)  # last, as in the reference
        self.impl = impl


class ClassEncoder(ref.ClassEncoder):
    """The reference's layers with fast pads and the channels_last-keeping global pool."""
    block, pool = PlainConv2dBlock, GlobalAvgPool


class ActFirstResBlock(ref_dis.ActFirstResBlock):
    block = PlainConv2dBlock


class Discriminator(Switchable, ref_dis.Discriminator):
    """FUNIT's discriminator with every reflect pad by `kernels.reflect_pad` (same keys and
    initialisation as the reference). `impl` as the Generator's."""
    block, res_block, pad, avg_pool = PlainConv2dBlock, ActFirstResBlock, ReflectPad2d, AvgPool2d
