"""Per-approach training steps (SPEC §2-§5): networks, optimisers, the D step (with R1 where the
approach has it), the G step and the EMA update.

Each iteration is `train_step(x, y)`: D step, then G step on the same batch, then EMA. Losses are
returned as a dict of detached scalar tensors (no host synchronisation here; the caller decides
when to call `.item()`). Seeding is the caller's job (`torch.manual_seed` before construction).
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
import torch.nn as nn

from ..config import BaseConfig, CycleFunitConfig, Funit2FunitConfig, NaiveConfig
from .backend import ReferenceBackend, ema_update  # noqa: F401  (re-exported: callers import them from here)
from .funit import init_generator
from .g2g import G2GOutputs, disassemble, g2g_forward, make_pairs, shot_class_codes
from .identity import IdentityEncoder
from .losses import code_cycle, feature_matching, hinge_d_fake, hinge_d_real, hinge_g, l1, lsgan, r1_penalty
from .vgg import VGGPerceptual, perceptual_l1
from .weights import load_checked

log = logging.getLogger("g2g_fast")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    return sum(weights[k] * v for k, v in terms.items())


# What an Approach reads from the weight files its config names (init_funit, identity_weights,
# vgg_weights):
#   "files"      a new run: all of them
#   "resume"     a checkpoint's state follows: the networks it saves (G, with CycleFUNIT's identity
#                class encoder inside) are only built, while the frozen loss networks (VGG, the
#                identity net of delta_identity) still come from their files, as training needs them
#   "inference"  a checkpoint follows and no loss is computed (translate, evaluate): no file is read,
#                so a checkpoint works on a machine without the pretrained files it was trained with
INIT_MODES = ("files", "resume", "inference")


class Approach:
    """Base class: owns gen (+ gen_ema) and dis (or None), their optimisers and the step count."""

    config_class: type[BaseConfig] = BaseConfig
    uses_short = True  # whether the G step needs the short reconstructions s_i

    def __init__(self, cfg: BaseConfig, num_classes: int, device: str | torch.device = "cpu",
                 precision: str = "fp32", skip_nonfinite: bool = False, backend=None, init: str = "files"):
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        cfg.validate()
        if num_classes < 2:
            raise ValueError(f"G2G needs at least 2 classes in the data, got {num_classes}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        self.init = init
        self.cfg, self.num_classes, self.device = cfg, num_classes, torch.device(device)
        self.precision, self.amp_dtype = precision, PRECISIONS[precision]
        # nan_policy "skip": a step whose loss is not finite applies no update (costs one host
        # sync per phase); otherwise the caller checks the returned losses.
        self.skip_nonfinite, self.skipped = skip_nonfinite, 0
        # Several ranks (g2g_fast.distributed.GradSync): averages gradients between backward and
        # the optimiser step; None for one process, which then pays nothing.
        self.grad_sync = None
        self.step = 0
        self.backend = backend or ReferenceBackend()
        self.ema_init = None  # the EMA's initial state when --init-funit gives one (init_generator)
        self.gen, self.dis = self.build_networks()
        self.gen.to(self.device, memory_format=self.backend.memory_format)
        if self.dis is not None:
            self.dis.to(self.device, memory_format=self.backend.memory_format)
        # The EMA copy is taken after initialisation (and after loading pretrained weights).
        self.gen_ema = None
        if cfg.ema_beta > 0:
            self.gen_ema = copy.deepcopy(self.gen).requires_grad_(False)
            if self.ema_init is not None:
                load_checked(self.gen_ema, self.ema_init, f"--init-funit {cfg.init_funit} [gen_test]", "FUNIT generator")
        self.ema_init = None
        self.opt_g, self.opt_d = self.build_optimizers()
        # fp16 needs loss scaling (bf16 has fp32's range and does not).
        fp16 = precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.scaler_d = torch.amp.GradScaler(self.device.type) if fp16 and self.dis is not None else None

    # --- to be provided by each approach -------------------------------------------------
    def build_networks(self) -> tuple[nn.Module, nn.Module | None]:
        raise NotImplementedError

    def build_optimizers(self):
        raise NotImplementedError

    def d_loss(self, x, y, x1, y1, x2, y2, m1, m2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def g_loss(self, o: G2GOutputs, y1, y2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # --- the phases ----------------------------------------------------------------------
    def autocast(self):
        """Mixed precision for the forward passes; fp32 runs without autocast."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def r1_autocast(self):
        """Where D's pass over the real images runs, R1's double backward included: under fp16 in
        fp32 (autocast off), elsewhere in the step's precision. R1's first-order gradient of a
        batch mean is small (~1e-11 a pixel for a quiet D) and the second-order pass of the
        penalty runs at that unscaled size whatever loss scale the first-order pass is given (the
        scale cancels in d penalty / d gradient), so fp16 flushes D's R1 gradient to zero without
        any inf for the GradScaler to see (tests/test_steps.py). bf16 has fp32's range."""
        if self.precision == "fp16":
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()

    def _update(self, loss: torch.Tensor, opt, scaler) -> None:
        """Backward and optimiser step (loss-scaled under fp16); skipped for a non-finite loss
        when skip_nonfinite is set."""
        if self.init == "inference":  # before the first update of a step (D's), so nothing changes
            raise RuntimeError("this approach was built with init='inference' (no loss networks were "
                               "loaded); build it with init='resume' to train from a checkpoint")
        sync = self.grad_sync
        if self.skip_nonfinite:
            finite = torch.isfinite(loss)
            if sync is not None:
                finite = sync.all_true(finite)  # one rank's bad loss skips the update on every rank
            if not bool(finite):
                self.skipped += 1
                return
        opt.zero_grad(set_to_none=True)
        if sync is not None:
            # Buckets of gradients start their all-reduce during backward, as soon as they are
            # complete. Under fp16 each rank backpropagates loss / W and the ranks' gradients are
            # summed, not averaged: its fp16 activation gradients then have one process's size
            # (1/(W*B) per image), where averaging after backward leaves them W x larger,
            # overflowing (and skipping the step) at 1/W of the scale one process reaches.
            sync.begin(opt, average=scaler is None)
        if scaler is None:
            loss.backward()
        else:
            scaled = scaler.scale(loss)
            (scaled if sync is None else scaled / sync.world_size).backward()
        if sync is not None:
            sync.finish(opt)  # scaled: every rank's scaler sees the same infs and scales alike
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()

    def class_codes(self, y: torch.Tensor, shots: torch.Tensor | None):
        """Stage 1's class codes (b1, b2) with K-shot class codes in training (`class_shots` K):
        each image's is the mean of E_B over its K shot images (other images of its class), paired
        as the images are; None without (E_B of each image itself). Used for the mixes, the short
        reconstructions and D's fakes; the reassembly encodes each mix alone (g2g_forward)."""
        k = getattr(self.cfg, "class_shots", 0)
        if not k:
            return None
        codes = shot_class_codes(self.gen, shots, k)
        b1, _, b2, _ = make_pairs(codes, y, self.cfg.pairing)
        return b1, b2

    def d_step(self, x: torch.Tensor, y: torch.Tensor, shots: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x1, y1, x2, y2 = make_pairs(x, y, self.cfg.pairing)
        with self.autocast():
            with torch.no_grad():
                o = disassemble(self.gen, x1, x2, class_codes=self.class_codes(y, shots))
            loss, terms = self.d_loss(x, y, x1, y1, x2, y2, o.m1, o.m2)
        self._update(loss, self.opt_d, self.scaler_d)
        return {**{k: v.detach().float() for k, v in terms.items()}, "d_total": loss.detach().float()}

    def g_step(self, x: torch.Tensor, y: torch.Tensor, shots: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x1, y1, x2, y2 = make_pairs(x, y, self.cfg.pairing)
        # D's weight gradients in the G step would be discarded by the next D step: not
        # computing them is exact and saves that work (SPEC §7).
        if self.dis is not None:
            self.dis.requires_grad_(False)
        try:
            with self.autocast():
                o = g2g_forward(self.gen, x1, x2, short=self.uses_short, class_codes=self.class_codes(y, shots))
                loss, terms = self.g_loss(o, y1, y2)
            self._update(loss, self.opt_g, self.scaler_g)
        finally:
            if self.dis is not None:
                self.dis.requires_grad_(True)
        return {**{k: v.detach().float() for k, v in terms.items()}, "g_total": loss.detach().float()}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, timer=None, shots: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        """D step, G step, EMA. `timer(name)` (optional) is a context manager timing each phase.
        `shots` (B * K, 3, H, W): with `class_shots` K > 0, the K other images of each image's
        class (image j's at rows j*K ... j*K + K-1, as the loaders deliver them)."""
        timer = timer or (lambda name: contextlib.nullcontext())
        x = x.contiguous(memory_format=self.backend.memory_format)
        k = getattr(self.cfg, "class_shots", 0)
        if k:
            if shots is None or shots.shape[0] != k * x.shape[0] or shots.shape[1:] != x.shape[1:]:
                got = "none" if shots is None else f"shape {tuple(shots.shape)}"
                raise ValueError(f"class_shots={k}: train_step needs the K-shot images, shots of shape "
                                 f"{(k * x.shape[0], *x.shape[1:])} (a loader built with shots={k} delivers "
                                 f"them); got {got}")
            shots = shots.contiguous(memory_format=self.backend.memory_format)
        elif shots is not None:
            raise ValueError("shots given, but the config has class_shots=0")
        losses = {}
        if self.dis is not None:
            with timer("D"):
                losses.update(self.d_step(x, y, shots))
        with timer("G"):
            losses.update(self.g_step(x, y, shots))
        if self.gen_ema is not None:
            with timer("ema"):
                self.backend.ema_update(self.gen_ema, self.gen, self.cfg.ema_beta)
        self.step += 1
        return losses

    # --- state ---------------------------------------------------------------------------
    def _stateful(self) -> dict:
        """Name -> object with state_dict()/load_state_dict(), for what this approach has."""
        items = {"gen": self.gen, "gen_test": self.gen_ema, "dis": self.dis, "opt_g": self.opt_g,
                 "opt_d": self.opt_d, "scaler_g": self.scaler_g, "scaler_d": self.scaler_d}
        return {k: v for k, v in items.items() if v is not None}

    def state_dict(self) -> dict:
        return {"step": self.step, **{k: v.state_dict() for k, v in self._stateful().items()}}

    def load_state_dict(self, sd: dict, source: str = "checkpoint") -> None:
        """Restore everything `state_dict` saved; networks are checked key by key and shape by
        shape (the error names `source` and the first mismatches)."""
        missing = [k for k in self._stateful() if k not in sd]
        if missing:
            raise ValueError(f"{source}: has no {', '.join(missing)} (saved by another approach or precision?)")
        for name, obj in self._stateful().items():
            if isinstance(obj, nn.Module):
                load_checked(obj, sd[name], source, f"{self.cfg.approach} {name}")
            else:
                obj.load_state_dict(sd[name])
        self.step = int(sd["step"])


class Funit2Funit(Approach):
    """FUNIT's generator wired twice; FUNIT's hinge GAN + R1 + feature matching + long losses."""

    config_class = Funit2FunitConfig

    def build_networks(self):
        cfg = self.cfg
        gen = self.backend.generator(**cfg.arch_kwargs())
        self.ema_init = init_generator(gen, cfg, self.init)
        return gen, self.backend.discriminator(self.num_classes, cfg.dis_nf, cfg.dis_n_res_blks)

    def build_optimizers(self):
        cfg = self.cfg

        def rmsprop(params, lr):
            return self.backend.rmsprop(params, lr=lr, alpha=cfg.rms_alpha, eps=cfg.rms_eps,
                                       weight_decay=cfg.weight_decay)

        return rmsprop(trainable(self.gen), cfg.lr_gen), rmsprop(trainable(self.dis), cfg.lr_dis)

    def d_loss(self, x, y, x1, y1, x2, y2, m1, m2):
        real, reg = [], []
        for xi, yi in ((x1, y1), (x2, y2)):
            xi = xi.detach().requires_grad_(True)
            with self.r1_autocast():
                resp, _ = self.dis(xi, yi)
                real.append(hinge_d_real(resp))
                reg.append(r1_penalty(resp, xi))
        # Each mix is judged on the class it carries: m1 has x2's class (label y2), m2 has y1.
        # (The original code used the swapped labels.)
        fake = [hinge_d_fake(self.dis(m1, y2)[0]), hinge_d_fake(self.dis(m2, y1)[0])]
        # R1 squares the gradient of a batch mean, so it scales as 1/n^3 in a call's n images: on W
        # ranks of n images each the ranks' mean is W^2 x the penalty of one process on all W*n.
        world = self.grad_sync.world_size if self.grad_sync is not None else 1
        terms = {"d_real": (real[0] + real[1]) / 2, "d_fake": (fake[0] + fake[1]) / 2,
                 "d_r1": (reg[0] + reg[1]) / (2 * world ** 2)}
        w = {"d_real": self.cfg.gan_w, "d_fake": self.cfg.gan_w, "d_r1": self.cfg.r1_w}
        return weighted_total(terms, w), terms

    def g_loss(self, o, y1, y2):
        cfg, D, fm = self.cfg, self.dis, feature_matching
        resp_m1, f_m1 = D(o.m1, y2)   # m1 carries x2's class
        resp_m2, f_m2 = D(o.m2, y1)
        resp_s1, f_s1 = D(o.s1, y1)
        resp_s2, f_s2 = D(o.s2, y2)
        _, f_r1 = D(o.r1, y1)
        _, f_r2 = D(o.r2, y2)
        with torch.no_grad():  # targets: real-image features carry no gradient
            _, f_x1 = D(o.x1, y1)
            _, f_x2 = D(o.x2, y2)
        terms = {
            "g_adv": (hinge_g(resp_m1) + hinge_g(resp_m2) + hinge_g(resp_s1) + hinge_g(resp_s2)) / 4,
            "g_short": (l1(o.s1, o.x1) + l1(o.s2, o.x2)) / 2,
            "g_fm_rec": (fm(f_s1, f_x1) + fm(f_s2, f_x2)) / 2,
            "g_fm_mix": (fm(f_m1, f_x2) + fm(f_m2, f_x1)) / 2,       # mix vs the original of its class
            "g_long": (l1(o.r1, o.x1) + l1(o.r2, o.x2)) / 2,
            "g_fm_long": (fm(f_r1, f_x1) + fm(f_r2, f_x2)) / 2,
            "g_fm_mix_rec": (fm(f_r1, f_m2) + fm(f_r2, f_m1)) / 2,   # r_i vs the mix carrying its class
        }
        w = {"g_adv": cfg.gan_w, "g_short": cfg.r_w, "g_fm_rec": cfg.fm_rec_w, "g_fm_mix": cfg.fm_w,
             "g_long": cfg.rl_w, "g_fm_long": cfg.fml_w, "g_fm_mix_rec": cfg.fml_mix_rec_w}
        return weighted_total(terms, w), terms


class CycleFunit(Approach):
    """FUNIT encoders/decoder + CycleGAN PatchGAN (LSGAN) + perceptual and code-cycle losses."""

    config_class = CycleFunitConfig

    def build_networks(self):
        cfg = self.cfg
        self.id_net = self.vgg = None
        if cfg.class_encoder == "identity" and self.init != "files":
            # Part of G: its weights are in the checkpoint that follows.
            self.id_net = IdentityEncoder.architecture().to(self.device)
        elif cfg.class_encoder == "identity" or (cfg.delta_identity > 0 and self.init != "inference"):
            self.id_net = IdentityEncoder.from_file(cfg.identity_weights).to(self.device)
        class_encoder = self.id_net if cfg.class_encoder == "identity" else None
        if class_encoder is not None and cfg.init_funit:
            raise ValueError("init_funit cannot be combined with class_encoder='identity' "
                             "(the MLP input differs from FUNIT's)")
        # Every file is read before anything is logged: a bad one is then the only message.
        if self.init != "inference" and cfg.vgg_weights:  # (inference: no perceptual loss computed)
            self.vgg = VGGPerceptual.from_file(cfg.vgg_weights).to(self.device)
        gen = self.backend.generator(**cfg.arch_kwargs(), class_encoder=class_encoder)
        self.ema_init = init_generator(gen, cfg, self.init)
        if self.init != "inference" and not cfg.vgg_weights:
            log.warning("no vgg_weights given: the perceptual loss falls back to pixel L1")
        return gen, self.backend.patch_discriminator(cfg.patch_nf)

    def build_optimizers(self):
        cfg = self.cfg
        betas = (cfg.beta1, cfg.beta2)
        return (self.backend.adam(trainable(self.gen), lr=cfg.lr, betas=betas),
                self.backend.adam(trainable(self.dis), lr=cfg.lr, betas=betas))

    def d_loss(self, x, y, x1, y1, x2, y2, m1, m2):
        terms = {"d_real": lsgan(self.dis(x), True), "d_fake": lsgan(self.dis(torch.cat([m1, m2])), False)}
        return 0.5 * (terms["d_real"] + terms["d_fake"]), terms

    def identity_weight(self) -> float:
        """delta_identity with its linear warm-up over the first identity_warmup_steps steps."""
        cfg = self.cfg
        if cfg.identity_warmup_steps <= 0:
            return cfg.delta_identity
        return cfg.delta_identity * min(1.0, (self.step + 1) / cfg.identity_warmup_steps)

    def g_loss(self, o, y1, y2):
        cfg = self.cfg

        def P(a, b):
            return perceptual_l1(self.vgg, a, b)

        content, klass = code_cycle(o)
        terms = {
            "g_long": P(o.x1, o.r1) + P(o.x2, o.r2),
            "g_short": P(o.x1, o.s1) + P(o.x2, o.s2),
            "g_content_cycle": content,
            "g_class_cycle": klass,
            "g_gan": lsgan(self.dis(torch.cat([o.m1, o.m2])), True),
        }
        w = {"g_long": cfg.alpha_long, "g_short": cfg.alpha_short, "g_content_cycle": cfg.gamma_content,
             "g_class_cycle": cfg.gamma_class, "g_gan": cfg.delta_gan}
        if cfg.delta_identity > 0:
            idn = self.id_net
            with torch.no_grad():
                id1, id2 = idn(o.x1), idn(o.x2)
            terms["g_identity"] = l1(idn(o.m2), id1) + l1(idn(o.m1), id2)
            w["g_identity"] = self.identity_weight()
        return weighted_total(terms, w), terms


class Naive(Approach):
    """Symmetric BN encoders + LORD generator; long L1 + code cycles, no GAN (paper eq. 4)."""

    config_class = NaiveConfig
    uses_short = False

    def build_networks(self):
        return self.backend.naive_model(self.cfg.image_size, self.cfg.code_dim, self.cfg.gen_channels), None

    def build_optimizers(self):
        cfg = self.cfg
        return self.backend.adam(trainable(self.gen), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)), None

    def g_loss(self, o, y1, y2):
        content, klass = code_cycle(o)
        terms = {"g_long": l1(o.r1, o.x1) + l1(o.r2, o.x2),
                 "g_content_cycle": content, "g_class_cycle": klass}
        w = {"g_long": 1.0, "g_content_cycle": self.cfg.gamma, "g_class_cycle": self.cfg.gamma}
        return weighted_total(terms, w), terms


APPROACHES: dict[str, type[Approach]] = {
    "funit2funit": Funit2Funit, "cyclefunit": CycleFunit, "naive": Naive,
}


def build_approach(cfg: BaseConfig, num_classes: int, device="cpu", **kwargs) -> Approach:
    return APPROACHES[cfg.approach](cfg, num_classes, device, **kwargs)
