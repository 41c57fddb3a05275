"""Configuration: one dataclass per approach, every default commented (SPEC §2-§5).

Configs are flat so that any field can be overridden by name (`--set r_w=0.2`); unknown names are
rejected. `config_from_dict` is the single way to build one from user input.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class BaseConfig:
    approach: ClassVar[str] = ""
    image_size: int = 128        # training crop, pixels (FUNIT animal faces: resize 140, crop 128)
    batch_size: int = 4          # images per step, even: B/2 (halves) or B-1 (chain) pairs; each step is
                                 # one D and one G update on the same B images
    pairing: str = "halves"      # "halves": (x[j], x[j+B/2]) as the original code; "chain": (x[i], x[i+1]) as the paper
    seed: int = 0                # seeds weights, data order and augmentation
    ema_beta: float = 0.999      # p_ema = beta*p_ema + (1-beta)*p after every G step; 0 disables EMA

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        check_fields(self)
        if self.pairing not in ("halves", "chain"):
            raise ValueError(f"pairing must be 'halves' or 'chain', got {self.pairing!r}")
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(f"batch_size must be even and >= 2 (images are paired), got {self.batch_size}")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")


@dataclass
class FunitArchConfig(BaseConfig):
    nf: int = 64                 # base width of FUNIT's encoders and decoder (animal-faces config)
    n_res_blks: int = 2          # ResBlocks in the content encoder = AdaIN ResBlocks in the decoder
    nf_mlp: int = 256            # hidden width of the class-code -> AdaIN-parameter MLP
    latent_dim: int = 64         # class code size
    n_mlp_blks: int = 3          # linear layers in that MLP
    n_downs_content: int = 3     # content code at H/8 x W/8 (CycleFUNIT may use 4 or 5)
    n_downs_class: int = 4       # stride-2 convs in the class encoder
    content_dim: int = 0         # channels of the content code: 0 = the encoder's width (nf * 2**n_downs_content,
                                 # FUNIT); k > 0 adds a linear 1x1 conv to k channels at the encoder's end and one
                                 # back at the decoder's start: a smaller content code (the paper's outlook)
    class_shots: int = 0         # K > 0: in training, the class code of each image's class is the mean of E_B over K
                                 # *other* images of that class (FUNIT's test-time K-shot moved into training), used
                                 # for the mixes, the short reconstructions and D's fakes; 0 = the image's own code
                                 # (FUNIT, the paper). G2G's reassembly still encodes each mix alone (docs/training.md)
    content_adv_w: float = 0.0   # > 0: an adversarial class classifier on the content code (reference/content_adversary.py):
                                 # G's loss gets this x the cross-entropy of its prediction vs uniform (ln C at best)
    content_adv_hidden: int = 0  # that classifier's hidden width: 0 = linear (the leakage probe's family)
    content_adv_lr: float = 1e-3  # its Adam learning rate (betas 0.5, 0.999), updated after each G step
    content_adv_memory: int = 512  # it learns from the content codes of the last this-many images and the step's
                                   # (a step of 8 images shows it ~1 a class); 0 = the step's alone
    class_encoder: str = "funit"  # "funit": FUNIT's class encoder; "coco": the same encoder, its code conditioned on
                                  # the content code as COCO-FUNIT's content-conditioned style encoder (Saito et al.
                                  # 2020) with its constant style bias (CycleFUNIT also: "identity")
    dec_norm: str = "in"         # the decoder's upsampling blocks: "in" (FUNIT's instance norm) | "none" (without
                                 # it, a content map keeps its channels' levels: global colour, background; issue 23)
    style_bias_dim: int = 1024   # class_encoder="coco": size of the learned constant style bias (COCO-FUNIT: 1024)
    init_funit: str | None = None  # official FUNIT generator file for the initial G (D stays fresh)
    init_funit_key: str = "auto"  # which generator of that file: "auto" (as the original: G <- "gen", the EMA
                                  # <- "gen_test"; a file with one of them: that one for both), "gen", "gen_test"

    def arch_kwargs(self) -> dict[str, int]:
        names = ("nf", "n_res_blks", "nf_mlp", "latent_dim", "n_mlp_blks", "n_downs_content", "n_downs_class",
                 "content_dim")
        kwargs = {n: getattr(self, n) for n in names}
        if self.class_encoder == "coco":  # (absent otherwise: FUNIT's Generator signature)
            kwargs["coco_bias_dim"] = self.style_bias_dim
        if self.dec_norm != "in":
            kwargs["dec_norm"] = self.dec_norm
        return kwargs

    CLASS_ENCODERS: ClassVar[tuple[str, ...]] = ("funit", "coco")

    def validate(self) -> None:
        super().validate()
        if self.class_encoder not in self.CLASS_ENCODERS:
            raise ValueError(f"class_encoder must be one of {', '.join(map(repr, self.CLASS_ENCODERS))}, "
                             f"got {self.class_encoder!r}")
        if self.class_encoder == "coco" and self.init_funit:
            raise ValueError("class_encoder='coco' adds COCO-FUNIT's style bias and two MLPs that an official "
                             "FUNIT generator file does not have; use init_funit with class_encoder='funit', or "
                             "train from scratch")
        if self.dec_norm not in ("in", "none"):
            raise ValueError(f"dec_norm must be 'in' or 'none', got {self.dec_norm!r}")
        if self.dec_norm != "in" and self.init_funit:
            raise ValueError("dec_norm='none' removes the instance norm a pretrained FUNIT decoder was trained with; "
                             "use init_funit with dec_norm='in', or train from scratch")
        if self.init_funit_key not in ("auto", "gen", "gen_test"):
            raise ValueError(f"init_funit_key must be 'auto', 'gen' or 'gen_test', got {self.init_funit_key!r}")
        if self.n_downs_class < 2:
            raise ValueError(f"n_downs_class must be >= 2 (the class encoder's first two downsamplings are "
                             f"fixed), got {self.n_downs_class}")
        if self.content_dim and self.init_funit:
            raise ValueError("content_dim > 0 adds two 1x1 convs that an official FUNIT generator file does not "
                             "have; use init_funit with content_dim=0, or train from scratch")
        if self.image_size % 2 ** max(self.n_downs_content, self.n_downs_class):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**n_downs "
                             f"({2 ** max(self.n_downs_content, self.n_downs_class)})")


@dataclass
class Funit2FunitConfig(FunitArchConfig):
    approach: ClassVar[str] = "funit2funit"
    batch_size: int = 8          # the original's "batch_size: 4" draws two loaders of 4: 4 pairs, 8 images
                                 # (R1 is per half: 4 images here would make it 4x stronger)
    dis_nf: int = 64             # FUNIT discriminator base width
    dis_n_res_blks: int = 10     # ActFirstResBlocks in the discriminator (even)
    gan_w: float = 1.0           # hinge adversarial weight (G: mean over m1, m2, s1, s2; D: real and fake)
    r_w: float = 0.1             # lambda_short: L1 of the short reconstructions s_i vs x_i
    fm_rec_w: float = 1.0        # feature matching s_i vs x_i (FUNIT's reconstruction FM)
    fm_w: float = 1.0            # lambda_D: feature matching m_i vs the original of its class
    rl_w: float = 0.01           # lambda_long: L1 of the two-stage reconstructions r_i vs x_i (paper's run: 0.1)
    fml_w: float = 0.1           # lambda_L: feature matching r_i vs x_i
    fml_mix_rec_w: float = 0.1   # lambda_R: feature matching r_i vs the mix that carries its class
    r1_w: float = 10.0           # R1 gradient penalty on real images (FUNIT)
    lr_gen: float = 1e-4         # RMSprop learning rate of G (FUNIT, constant)
    lr_dis: float = 1e-4         # RMSprop learning rate of D
    weight_decay: float = 1e-4   # RMSprop weight decay (FUNIT)
    rms_alpha: float = 0.99      # RMSprop smoothing constant (PyTorch default, FUNIT)
    rms_eps: float = 1e-8        # RMSprop eps (PyTorch default, FUNIT)


@dataclass
class CycleFunitConfig(FunitArchConfig):
    approach: ClassVar[str] = "cyclefunit"
    batch_size: int = 4          # the original CycleFUNIT splits one batch of 4 into 2 pairs: 4 images
    patch_nf: int = 64           # PatchGAN base width (CycleGAN)
    alpha_long: float = 1.0      # perceptual loss of the two-stage reconstructions r_i vs x_i
    alpha_short: float = 1.0     # perceptual loss of the short reconstructions s_i vs x_i
    gamma_content: float = 1.0   # content-code cycle: MSE(E_A(x1), E_A(m1)) + MSE(E_A(x2), E_A(m2))
    gamma_class: float = 1.0     # class-code cycle: MSE(E_B(x1), E_B(m2)) + MSE(E_B(x2), E_B(m1))
    delta_gan: float = 1.0       # LSGAN generator loss on the mixes
    delta_identity: float = 0.0  # paper eq. 8 identity loss through the frozen identity net (0 = off)
    identity_warmup_steps: int = 0  # linear warm-up of delta_identity over this many steps (0 = none)
    class_encoder: str = "funit"  # "funit" (trained FUNIT class encoder), "coco" (see FunitArchConfig) or
                                  # "identity" (frozen ResNet-50)
    identity_weights: str | None = None  # VGGFace2 resnet50_ft state-dict file (class_encoder=identity or delta_identity>0)
    vgg_weights: str | None = None  # torchvision vgg16 state-dict file for the relu2_2 loss; None = pixel L1
    lr: float = 2e-4             # Adam learning rate of G and D (CycleGAN)
    beta1: float = 0.9           # Adam beta1
    beta2: float = 0.999         # Adam beta2

    CLASS_ENCODERS: ClassVar[tuple[str, ...]] = ("funit", "coco", "identity")

    def validate(self) -> None:
        super().validate()
        needs_id = self.class_encoder == "identity" or self.delta_identity > 0
        if needs_id and not self.identity_weights:
            raise ValueError("identity_weights is required when class_encoder='identity' or "
                             "delta_identity > 0: pass a VGGFace2 resnet50_ft state-dict file")


@dataclass
class NaiveConfig(BaseConfig):
    approach: ClassVar[str] = "naive"
    batch_size: int = 32         # the paper's naive run used 32
    ema_beta: float = 0.0        # the original naive code kept no EMA
    code_dim: int = 256          # size of both codes (E_A and E_B outputs)
    gen_channels: int = 256      # width of the LORD generator's AdaIN conv stack (LORD: 256)
    gamma: float = 0.4           # weight of the four code-cycle MSE terms (paper eq. 4)
    lr: float = 2e-4             # Adam learning rate
    beta1: float = 0.9           # Adam beta1
    beta2: float = 0.999         # Adam beta2

    def validate(self) -> None:
        super().validate()
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 for the naive approach, got {self.image_size}")


# --- Typed values -----------------------------------------------------------------------------
# Every value of a config or of the trainer's options is checked against its field's type and
# range whatever its source (preset, --config file, flag, --set, a checkpoint), so that a typo
# fails when the settings are resolved (--dry-run included), not at the first training step.

_AT_LEAST_1 = ("image_size", "batch_size", "nf", "nf_mlp", "latent_dim", "dis_nf", "patch_nf", "code_dim",
               "gen_channels", "style_bias_dim")
_NON_NEGATIVE = ("seed", "n_res_blks", "n_downs_content", "content_dim", "class_shots", "identity_warmup_steps",
                 "content_adv_w", "content_adv_hidden", "content_adv_memory",
                 "weight_decay",
                 # loss weights: 0 switches a term off, a negative weight would reward the error
                 "gan_w", "r_w", "fm_rec_w", "fm_w", "rl_w", "fml_w", "fml_mix_rec_w", "r1_w", "alpha_long",
                 "alpha_short", "gamma_content", "gamma_class", "delta_gan", "delta_identity", "gamma")
_POSITIVE = ("lr", "lr_gen", "lr_dis", "rms_eps", "content_adv_lr")
_UNIT = ("rms_alpha", "beta1", "beta2")  # [0, 1): decay rates
RANGES: dict[str, str] = {**dict.fromkeys(_AT_LEAST_1, ">= 1"), **dict.fromkeys(_NON_NEGATIVE, ">= 0"),
                          **dict.fromkeys(_POSITIVE, "> 0"), **dict.fromkeys(_UNIT, "in [0, 1)"),
                          "n_mlp_blks": ">= 2", "dis_n_res_blks": ">= 2 and even"}
_RANGE_OK = {">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, ">= 2": lambda v: v >= 2,
             "> 0": lambda v: v > 0, "in [0, 1)": lambda v: 0 <= v < 1,
             ">= 2 and even": lambda v: v >= 2 and v % 2 == 0}
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null", "")


def field_type(cls, name: str) -> tuple[type, bool]:
    """-> (int | float | bool | str, whether None is allowed) of dataclass field `name`."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else ()
    if args:
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def parse_field(cls, name: str, text: str) -> Any:
    """The value of `name` written as text (`--set name=text`), parsed as its field's type."""
    typ, optional = field_type(cls, name)
    low = text.strip().lower()
    if optional and low in _NONE:
        return None
    if typ is bool:
        if low in _TRUE + _FALSE:
            return low in _TRUE
        raise ValueError(f"{name} must be {_TYPE_WORDS[bool]}, got {text!r}")
    if typ is str:
        return text
    try:
        return typ(text.strip()) if typ is float else int(text.strip())
    except ValueError:
        try:  # '1e3' or '8.0' for an integer: the number, which check_value then judges
            return float(text.strip())
        except ValueError:
            raise ValueError(f"{name} must be {_TYPE_WORDS[typ]}, got {text!r}") from None


def check_value(cls, name: str, value: Any) -> Any:
    """`value` of field `name` normalised to its type (an integral float becomes an int, an int a
    float); raises ValueError naming the field when the type or range is wrong."""
    typ, optional = field_type(cls, name)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {_TYPE_WORDS.get(typ, typ.__name__)}, got None")
    ok = isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
    if typ is int and isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        value, ok = int(value), True
    elif typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{name} must be {_TYPE_WORDS.get(typ, typ.__name__)}, got {value!r}")
    if typ is float and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    rule = RANGES.get(name)
    if rule is not None and not _RANGE_OK[rule](value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def check_fields(obj) -> None:
    """Check (and normalise in place) every field of a config or options dataclass."""
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check_value(type(obj), f.name, getattr(obj, f.name)))


CONFIGS: dict[str, type[BaseConfig]] = {c.approach: c for c in (Funit2FunitConfig, CycleFunitConfig, NaiveConfig)}


def config_from_dict(approach: str, values: dict[str, Any] | None = None) -> BaseConfig:
    """Build and validate the config of `approach` from `values`; unknown keys raise ValueError."""
    if approach not in CONFIGS:
        raise ValueError(f"unknown approach {approach!r}; choose one of {sorted(CONFIGS)}")
    cls = CONFIGS[approach]
    values = dict(values or {})
    values.pop("approach", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) for {approach}: {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    cfg = cls(**values)
    cfg.validate()
    return cfg


def config_to_dict(cfg: BaseConfig) -> dict[str, Any]:
    return {"approach": cfg.approach, **dataclasses.asdict(cfg)}
