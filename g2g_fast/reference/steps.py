"""Per-approach training steps (SPEC §2-§5): networks, optimisers, the D step (with R1 where the
approach has it), the G step and the EMA update.

Each iteration is `train_step(x, y)` of the shared base class (`reference/approach.py`): D step,
then G step on the same batch, then EMA. Here: what each approach builds and computes.
"""
from __future__ import annotations

import logging

import torch

from ..config import BaseConfig, CycleFunitConfig, Funit2FunitConfig, NaiveConfig
from .approach import PRECISIONS, Approach, trainable, weighted_total  # noqa: F401  (re-exported)
from .backend import ReferenceBackend, ema_update  # noqa: F401  (re-exported: callers import them from here)
from .funit import init_generator
from .identity import IdentityEncoder
from .losses import code_cycle, feature_matching, hinge_d_fake, hinge_d_real, hinge_g, l1, lsgan, r1_penalty
from .vgg import VGGPerceptual, perceptual_l1

log = logging.getLogger("g2g_fast")


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
