"""The training step every approach shares (SPEC §2-§5): `Approach` owns G (+ its EMA) and D, their
optimisers and the step count, and runs an iteration as D step, G step, EMA, with mixed precision,
loss scaling, the non-finite policy, the multi-rank gradient sync and K-shot class codes. What
differs per approach (networks, optimisers, the D and G losses) is in `steps.py`.

Losses are returned as a dict of detached scalar tensors (no host synchronisation here; the caller
decides when to call `.item()`). Seeding is the caller's job (`torch.manual_seed` before construction).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from ..config import BaseConfig
from .backend import ReferenceBackend
from .content_adversary import ContentAdversary, accuracy, adversary_loss, confusion_loss, pooled_size
from .g2g import G2GOutputs, disassemble, g2g_forward, make_pairs, shot_class_codes
from .weights import load_checked

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
        # Several ranks (g2g_fast.grad_sync.GradSync): averages gradients between backward and
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
        self.adv, self.opt_adv = self.build_content_adversary()
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

    def build_content_adversary(self):
        """(adversary, its Adam) with `content_adv_w` > 0 (FUNIT's encoders), else (None, None).
        Built after G, D and their optimisers, so that a run without it draws the same weights."""
        cfg = self.cfg
        if getattr(cfg, "content_adv_w", 0.0) <= 0:
            return None, None
        adv = ContentAdversary(self.gen.enc_content.code_dim, pooled_size(cfg.image_size, cfg.n_downs_content), self.num_classes,
                               cfg.content_adv_hidden, cfg.content_adv_memory).to(self.device)
        return adv, torch.optim.Adam(adv.parameters(), lr=cfg.content_adv_lr, betas=(0.5, 0.999))

    def content_adversary_step(self, o: G2GOutputs, y1, y2, loss, terms):
        """G's confusion term (added to `loss`, A frozen by the caller) -> (loss, codes, labels)."""
        codes, labels = torch.cat([o.a1, o.a2]), torch.cat([y1, y2])
        terms["g_content_adv"] = confusion_loss(self.adv(codes))
        return loss + self.cfg.content_adv_w * terms["g_content_adv"], codes.detach(), labels

    def update_content_adversary(self, codes, labels) -> dict[str, torch.Tensor]:
        """A's own step on the G step's (detached) content codes: learn to tell their class."""
        logits, labels = self.adv.training_logits(codes, labels)
        loss = adversary_loss(logits, labels)
        self._update(loss, self.opt_adv, None)
        return {"adv_ce": loss.detach(), "adv_acc": accuracy(logits.detach(), labels)}

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
        frozen = [net for net in (self.dis, self.adv) if net is not None]
        for net in frozen:
            net.requires_grad_(False)
        try:
            with self.autocast():
                o = g2g_forward(self.gen, x1, x2, short=self.uses_short, class_codes=self.class_codes(y, shots))
                loss, terms = self.g_loss(o, y1, y2)
                if self.adv is not None:
                    loss, codes, labels = self.content_adversary_step(o, y1, y2, loss, terms)
            self._update(loss, self.opt_g, self.scaler_g)
        finally:
            for net in frozen:
                net.requires_grad_(True)
        out = {**{k: v.detach().float() for k, v in terms.items()}, "g_total": loss.detach().float()}
        if self.adv is not None:
            out.update(self.update_content_adversary(codes, labels))
        return out

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
                 "opt_d": self.opt_d, "scaler_g": self.scaler_g, "scaler_d": self.scaler_d,
                 "adv": self.adv, "opt_adv": self.opt_adv}
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
