"""FUNIT networks (Liu et al. 2019) in plain PyTorch, in the official state-dict layout (SPEC §2).

Module names mirror NVlabs/FUNIT (`enc_content.model.0.conv.weight`, ...) so an official
generator file loads with `strict=True` and our files load into FUNIT's code. Unlike FUNIT, the
decoder takes its AdaIN parameters as an argument instead of having them assigned onto modules.
The discriminator is in `funit_dis.py`.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import adain_ref
from ..torch_files import safe_torch_load
from .weights import load_checked

log = logging.getLogger("g2g_fast")


def _activate(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(x)
    if act == "lrelu":
        return F.leaky_relu(x, 0.2)
    if act == "tanh":
        return torch.tanh(x)
    return x


class AdaptiveInstanceNorm2d(nn.Module):
    """Holds FUNIT's AdaIN buffers so the key layout matches; they are never read (FUNIT's AdaIN
    always normalises with instance statistics). The weight/bias come from the MLP per call."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))


class Conv2dBlock(nn.Module):
    """[act] -> pad -> conv -> [norm] -> [act], FUNIT's Conv2dBlock.

    norm: "none" | "in" (instance norm, no affine) | "adain" (weight/bias given per call).
    Padding is reflect (FUNIT's generator and D) or zero (D's 1x1 convs have none).
    """

    def __init__(self, cin, cout, k, stride=1, padding=0, *, norm="none", act="relu",
                 act_first=False, bias=True):
        super().__init__()
        self.padding, self.norm_kind, self.act, self.act_first = padding, norm, act, act_first
        self.conv = nn.Conv2d(cin, cout, k, stride, bias=bias)
        if norm == "adain":
            self.norm = AdaptiveInstanceNorm2d(cout)

    def forward(self, x, style: tuple[torch.Tensor, torch.Tensor] | None = None):
        if self.act_first:
            x = _activate(x, self.act)
        if self.padding:
            x = self.pad(x)
        x = self.conv(x)
        post_act = "none" if self.act_first else self.act
        if self.norm_kind == "in":
            return adain_ref(x, act=post_act)
        if self.norm_kind == "adain":
            weight, bias = style
            return adain_ref(x, weight, bias, act=post_act)
        return _activate(x, post_act)


    def pad(self, x):
        """Reflect padding (the fast models' blocks replace it by `kernels.reflect_pad`)."""
        return F.pad(x, (self.padding,) * 4, mode="reflect")


class ResBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus the identity skip."""

    def __init__(self, dim, norm):
        super().__init__()
        self.model = nn.Sequential(
            Conv2dBlock(dim, dim, 3, 1, 1, norm=norm, act="relu"),
            Conv2dBlock(dim, dim, 3, 1, 1, norm=norm, act="none"),
        )

    def forward(self, x, styles=(None, None)):
        return self.model[1](self.model[0](x, styles[0]), styles[1]) + x


class ResBlocks(nn.Module):
    def __init__(self, n, dim, norm):
        super().__init__()
        self.model = nn.Sequential(*[ResBlock(dim, norm) for _ in range(n)])

    def forward(self, x, styles=None):
        for i, block in enumerate(self.model):
            x = block(x, (None, None) if styles is None else styles[2 * i: 2 * i + 2])
        return x


class ContentEncoder(nn.Module):
    """7x7 conv, `downs` stride-2 4x4 convs (width doubling), ResBlocks; all IN + ReLU.

    `code_dim` > 0 appends a linear 1x1 conv (bias, no norm or activation) to `code_dim` channels,
    as `model.{downs + 2}`: the content code shrinks while FUNIT's keys stay as they are.
    `output_dim` is the width of the last ResBlocks (the decoder's width), `code_dim` the code's."""

    def __init__(self, downs, n_res, dim, code_dim=0):
        super().__init__()
        layers = [Conv2dBlock(3, dim, 7, 1, 3, norm="in", act="relu")]
        for _ in range(downs):
            layers.append(Conv2dBlock(dim, 2 * dim, 4, 2, 1, norm="in", act="relu"))
            dim *= 2
        layers.append(ResBlocks(n_res, dim, "in"))
        if code_dim:
            layers.append(nn.Conv2d(dim, code_dim, 1))
        self.model = nn.Sequential(*layers)
        self.output_dim = dim
        self.code_dim = code_dim or dim

    def forward(self, x):
        return self.model(x)


class ClassEncoder(nn.Module):
    """No norm: 7x7 conv, two width-doubling downs, `downs - 2` more downs, global pool, 1x1 conv."""

    # The fast model's subclass swaps in its own (no parameters of their own: same keys).
    block, pool = Conv2dBlock, nn.AdaptiveAvgPool2d

    def __init__(self, downs, dim, latent_dim):
        super().__init__()
        block = self.block
        layers = [block(3, dim, 7, 1, 3, act="relu")]
        for _ in range(2):
            layers.append(block(dim, 2 * dim, 4, 2, 1, act="relu"))
            dim *= 2
        for _ in range(downs - 2):
            layers.append(block(dim, dim, 4, 2, 1, act="relu"))
        layers += [self.pool(1), nn.Conv2d(dim, latent_dim, 1, 1, 0)]
        self.model = nn.Sequential(*layers)
        self.out_dim = latent_dim

    def forward(self, x):
        return self.model(x).flatten(1)


class Decoder(nn.Module):
    """AdaIN ResBlocks, then `ups` x [nearest up x2, 5x5 conv, IN, ReLU], then 7x7 conv + tanh.

    `norm` "none" (`dec_norm`, issue 23): the upsampling blocks without FUNIT's IN, which sets every
    channel's spatial mean and spread to 0 and 1 and so removes whatever a map carries as a channel's
    overall level or amplitude (a global colour, a background grey) from the content path.

    `code_dim` > 0 (the content code's channels, when they differ from `dim`): a linear 1x1 conv
    `content_in` takes the code back to `dim` channels before the AdaIN ResBlocks."""

    def __init__(self, ups, n_res, dim, code_dim=0, norm="in"):
        super().__init__()
        if code_dim:
            self.content_in = nn.Conv2d(code_dim, dim, 1)
        layers = [ResBlocks(n_res, dim, "adain")]
        for _ in range(ups):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       Conv2dBlock(dim, dim // 2, 5, 1, 2, norm=norm, act="relu")]
            dim //= 2
        layers.append(Conv2dBlock(dim, 3, 7, 1, 3, act="tanh"))
        self.model = nn.Sequential(*layers)

    def adain_layers(self) -> list[AdaptiveInstanceNorm2d]:
        return [m for m in self.modules() if isinstance(m, AdaptiveInstanceNorm2d)]

    def num_adain_params(self) -> int:
        return sum(2 * m.num_features for m in self.adain_layers())

    def split_adain_params(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Slice the MLP output per AdaIN layer in module order; each slice is [bias | weight]
        (FUNIT's assign_adain_params), used raw."""
        styles, offset = [], 0
        for m in self.adain_layers():
            n = m.num_features
            bias, weight = params[:, offset: offset + n], params[:, offset + n: offset + 2 * n]
            styles.append((weight, bias))
            offset += 2 * n
        return styles

    def expand(self, content):
        """The content code at the decoder's width (`content_in`, when there is one)."""
        return self.content_in(content) if hasattr(self, "content_in") else content

    def forward(self, content, adain_params):
        x = self.model[0](self.expand(content), self.split_adain_params(adain_params))
        for layer in self.model[1:]:
            x = layer(x)
        return x


class LinearBlock(nn.Module):
    def __init__(self, cin, cout, act):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.act = act

    def forward(self, x):
        return _activate(self.fc(x), self.act)


class MLP(nn.Module):
    """`n_blk` linear layers, ReLU between them; `out_act` on the last (FUNIT's: none)."""

    def __init__(self, cin, cout, dim, n_blk, out_act="none"):
        super().__init__()
        layers = [LinearBlock(cin, dim, "relu")]
        layers += [LinearBlock(dim, dim, "relu") for _ in range(n_blk - 2)]
        layers.append(LinearBlock(dim, cout, out_act))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x.flatten(1))


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): the mean over pixels, accumulated and returned in fp32 under
    autocast (a statistic; float64 stays float64)."""
    dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    return x.mean((2, 3), dtype=dtype)


class ContentConditioning(nn.Module):
    """COCO-FUNIT's content-conditioned style code (Saito et al. 2020), applied at decode time.

    `forward(content, class_code)` = mlp_style([class_code | style_bias]) * mlp_content(mean of
    the content code over its pixels): the class code that goes on to FUNIT's MLP, computed for
    the content code being decoded. `style_bias` (1, bias_dim) is COCO-FUNIT's learned constant
    ("universal") style bias, randn-initialised; both MLPs are 2 linear layers (hidden width
    `hidden`), each followed by a ReLU as in NVIDIA's implementation (imaginaire's MLP activates
    its last layer too), so both factors are non-negative. The swapped class code stays the class
    encoder's output.
    """

    pool = staticmethod(global_mean)  # the fast model's subclass keeps channels_last in its backward

    def __init__(self, content_dim: int, style_dim: int, hidden: int, bias_dim: int):
        super().__init__()
        self.style_bias = nn.Parameter(torch.randn(1, bias_dim))
        self.mlp_content = MLP(content_dim, style_dim, hidden, 2, out_act="relu")
        self.mlp_style = MLP(style_dim + bias_dim, style_dim, hidden, 2, out_act="relu")

    def forward(self, content: torch.Tensor, class_code: torch.Tensor) -> torch.Tensor:
        c = self.mlp_content(self.pool(content))
        code = class_code.flatten(1)
        bias = self.style_bias.expand(code.shape[0], -1)
        return self.mlp_style(torch.cat([code, bias], 1)) * c


def init_kaiming(module: nn.Module) -> None:
    """FUNIT's init: kaiming normal (fan_in, a=0) on every conv/linear weight, zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """FUNIT's FewShotGen with explicit style passing. Defaults = the animal-faces config.

    `class_encoder`: an optional replacement for FUNIT's class encoder (CycleFUNIT's frozen
    identity encoder); it must have an `out_dim` attribute, and the MLP input follows it.
    `content_dim` > 0: the content code has that many channels (a 1x1 conv at the content
    encoder's end, `enc_content.model.{n_downs_content + 2}`, and one at the decoder's start,
    `dec.content_in`); 0 keeps FUNIT's code and its 58-key layout exactly.
    `coco_bias_dim` > 0: COCO-FUNIT's content conditioning of the class code before the MLP
    (`coco`, a `ContentConditioning` with a style bias of that size; keys `coco.*` after FUNIT's,
    which keep their values for a seed); 0 = FUNIT.
    `dec_norm` "none": the decoder's upsampling blocks without IN (see Decoder); same keys.
    """

    conditioning_class = ContentConditioning  # the fast model's subclass swaps in its own (same keys)

    def __init__(self, nf=64, n_res_blks=2, nf_mlp=256, latent_dim=64, n_mlp_blks=3,
                 n_downs_content=3, n_downs_class=4, content_dim=0, class_encoder: nn.Module | None = None,
                 coco_bias_dim=0, dec_norm="in"):
        super().__init__()
        self.enc_class_model = class_encoder or ClassEncoder(n_downs_class, nf, latent_dim)
        self.enc_content = ContentEncoder(n_downs_content, n_res_blks, nf, content_dim)
        self.dec = Decoder(n_downs_content, n_res_blks, self.enc_content.output_dim, content_dim, dec_norm)
        self.mlp = MLP(self.enc_class_model.out_dim, self.dec.num_adain_params(), nf_mlp, n_mlp_blks)
        for part in (self.enc_content, self.dec, self.mlp) + (() if class_encoder else (self.enc_class_model,)):
            init_kaiming(part)
        self.coco = self.conditioning(coco_bias_dim, nf_mlp)

    def conditioning(self, bias_dim: int, hidden: int) -> ContentConditioning | None:
        """COCO-FUNIT's conditioning, built (and kaiming-initialised, its bias randn) after
        everything else so FUNIT's parts draw the same weights with or without it; None if 0."""
        if not bias_dim:
            return None
        coco = self.conditioning_class(self.enc_content.code_dim, self.enc_class_model.out_dim, hidden, bias_dim)
        init_kaiming(coco)  # the linears; style_bias keeps its randn
        return coco

    def encode_content(self, x):
        """(B, 3, H, W) -> content code (B, content_dim or nf * 2^downs, H / 2^downs, W / 2^downs)."""
        return self.enc_content(x)

    def encode_class(self, x):
        """(B, 3, H, W) -> class code (B, latent_dim)."""
        return self.enc_class_model(x)

    def decode(self, content, class_code):
        if self.coco is not None:  # COCO-FUNIT: the class code conditioned on this content code
            class_code = self.coco(content, class_code)
        return self.dec(content, self.mlp(class_code))

    def forward(self, x_content, x_class):
        return self.decode(self.encode_content(x_content), self.encode_class(x_class))


def read_official_file(path: str | os.PathLike, flag: str | None = None) -> dict:
    """An official FUNIT generator file ({'gen': sd, 'gen_test': sd}; either may be absent) as a
    dict; a g2g-fast checkpoint has the same two keys. Never runs pickled code. Errors name `flag`
    (the option that named the file) and the file."""
    ckpt = safe_torch_load(path, what="FUNIT generator file", flag=flag)
    label = f"{flag} {os.fspath(path)}" if flag else os.fspath(path)
    if not isinstance(ckpt, dict) or not any(isinstance(ckpt.get(k), dict) for k in ("gen", "gen_test")):
        found = ", ".join(map(str, list(ckpt)[:5])) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{label}: not a FUNIT generator file (expected the keys 'gen' and/or 'gen_test', "
                         f"found {found or 'nothing'})")
    return ckpt


def load_official_generator(gen: Generator, path: str | os.PathLike, which: str = "gen_test",
                            flag: str | None = None, ckpt: dict | None = None) -> None:
    """Load generator `which` of an official FUNIT generator file into `gen`.

    `which="gen_test"` takes the EMA weights FUNIT uses for inference; "gen" the trained ones.
    `ckpt`: the file's content when already read (`read_official_file`)."""
    label = f"{flag} {os.fspath(path)}" if flag else os.fspath(path)
    ckpt = read_official_file(path, flag) if ckpt is None else ckpt
    if not isinstance(ckpt.get(which), dict):
        raise ValueError(f"{label}: has no {which!r} generator (it has {', '.join(map(str, ckpt))})")
    load_checked(gen, ckpt[which], f"{label} [{which}]", "FUNIT generator")


def init_generator(gen: Generator, cfg, init: str = "files") -> dict | None:
    """Load `cfg.init_funit` (an official FUNIT generator file) into `gen` when given, for a new run.

    -> the EMA generator's initial state when the file gives one, else None (the EMA copies G).
    As the original FUNIT2FUNIT code, training continues from the file's "gen" and its EMA from
    "gen_test" when it has both (init_funit_key "auto"); "gen" or "gen_test" loads that one into both.
    """
    if init != "files":  # `init`: see g2g_fast.reference.steps.INIT_MODES
        return None  # the checkpoint's G replaces any initial weights
    if not cfg.init_funit:
        log.info("G and D initialised fresh")
        return None
    ckpt = read_official_file(cfg.init_funit, "--init-funit")
    both = all(isinstance(ckpt.get(k), dict) for k in ("gen", "gen_test"))
    key = cfg.init_funit_key
    if key == "auto":
        key = "gen" if both else next(k for k in ("gen", "gen_test") if isinstance(ckpt.get(k), dict))
    load_official_generator(gen, cfg.init_funit, key, flag="--init-funit", ckpt=ckpt)
    ema = ckpt["gen_test"] if both and cfg.init_funit_key == "auto" and cfg.ema_beta > 0 else None
    log.info("G initialised from %s [%s]%s; the discriminator is fresh (no FUNIT discriminator weights "
             "were released)", cfg.init_funit, key,
             ", its EMA from [gen_test]" if ema is not None else
             " (its EMA starts as a copy)" if cfg.ema_beta > 0 else "")
    return ema
