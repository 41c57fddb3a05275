"""Configuration: one dataclass per approach, every default commented (SPEC §2-§5).

Configs are flat so that any field can be overridden by name (`--set r_w=0.2`); unknown names are
rejected. `config_from_dict` is the single way to build one from user input.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class BaseConfig:
    approach: ClassVar[str] = ""
    image_size: int = 128        # training crop, pixels (FUNIT animal faces: resize 140, crop 128)
    batch_size: int = 4          # images per step, even: B/2 (halves) or B-1 (chain) pairs
    pairing: str = "halves"      # "halves": (x[j], x[j+B/2]) as the original code; "chain": (x[i], x[i+1]) as the paper
    seed: int = 0                # seeds weights, data order and augmentation
    ema_beta: float = 0.999      # p_ema = beta*p_ema + (1-beta)*p after every G step; 0 disables EMA

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
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
    init_funit: str | None = None  # official FUNIT generator file for the initial G (D stays fresh)
    init_funit_key: str = "gen_test"  # which generator of that file: "gen_test" (EMA) or "gen"

    def arch_kwargs(self) -> dict[str, int]:
        names = ("nf", "n_res_blks", "nf_mlp", "latent_dim", "n_mlp_blks", "n_downs_content", "n_downs_class")
        return {n: getattr(self, n) for n in names}

    def validate(self) -> None:
        super().validate()
        if self.image_size % 2 ** max(self.n_downs_content, self.n_downs_class):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**n_downs "
                             f"({2 ** max(self.n_downs_content, self.n_downs_class)})")


@dataclass
class Funit2FunitConfig(FunitArchConfig):
    approach: ClassVar[str] = "funit2funit"
    batch_size: int = 4          # the paper's FUNIT2FUNIT experiments used 4
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
    batch_size: int = 4          # the paper's CycleFUNIT experiments used 4
    patch_nf: int = 64           # PatchGAN base width (CycleGAN)
    alpha_long: float = 1.0      # perceptual loss of the two-stage reconstructions r_i vs x_i
    alpha_short: float = 1.0     # perceptual loss of the short reconstructions s_i vs x_i
    gamma_content: float = 1.0   # content-code cycle: MSE(E_A(x1), E_A(m1)) + MSE(E_A(x2), E_A(m2))
    gamma_class: float = 1.0     # class-code cycle: MSE(E_B(x1), E_B(m2)) + MSE(E_B(x2), E_B(m1))
    delta_gan: float = 1.0       # LSGAN generator loss on the mixes
    delta_identity: float = 0.0  # paper eq. 8 identity loss through the frozen identity net (0 = off)
    identity_warmup_steps: int = 0  # linear warm-up of delta_identity over this many steps (0 = none)
    class_encoder: str = "funit"  # "funit" (trained FUNIT class encoder) or "identity" (frozen ResNet-50)
    identity_weights: str | None = None  # VGGFace2 resnet50_ft state-dict file (class_encoder=identity or delta_identity>0)
    vgg_weights: str | None = None  # torchvision vgg16 state-dict file for the relu2_2 loss; None = pixel L1
    lr: float = 2e-4             # Adam learning rate of G and D (CycleGAN)
    beta1: float = 0.9           # Adam beta1
    beta2: float = 0.999         # Adam beta2

    def validate(self) -> None:
        super().validate()
        if self.class_encoder not in ("funit", "identity"):
            raise ValueError(f"class_encoder must be 'funit' or 'identity', got {self.class_encoder!r}")
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
