"""Disentanglement metrics of a G2G generator: pure functions of a model with encode_content /
encode_class / decode, the probes they use, and the table `python -m g2g_fast.evaluate` prints
(the CLI, the held-out data and the --eval-every evaluator are in evaluate.py).

Metrics (pairs (x1, x2) of held-out images of different classes; m1 = G(E_A(x1), E_B(x2))):
  recon_short_l1/psnr   s1 = G(E_A(x1), E_B(x1)) against x1 (and s2 against x2); L1 on [-1, 1],
                        PSNR in dB with peak-to-peak 2 (per image, capped at 100 dB, averaged)
  recon_long_l1/psnr    the two-stage reconstructions r1, r2 against x1, x2
  swap_acc              fraction of mixes that a probe CNN (trained on real training images)
                        classifies as the class that was swapped in: m1 as x2's, m2 as x1's
  swap_kept_acc         fraction classified as the class of the image that gave the content
  probe_class_acc       the probe's own accuracy on the real held-out images (the ceiling)
  content_error         synthetic data only: a probe CNN regresses the content factors of the
                        mixes; mean over factors of |error| / std of the factor (0 perfect, about
                        1.1 for unrelated images); content_mae: per factor in factor units
                        (light: angular error in radians); probe_content_*: same on real images;
                        content_factor_error: per factor in std units (their mean is content_error).
                        The shape family (--synthetic-family shape) adds hue (circular, as light;
                        error in turns) and texture (categorical: the argmax of the regressed one-hot;
                        error = misclassification rate, / 0.75, chance's rate, in std units)
  content_error_to_class   the same errors of the mixes against the factors of the image that gave
                        the class code (m1 against x2's); a factor whose error is small here and
                        large above rides on the class code (content_factor_error_to_class)
  recon_short_factor_error   per factor, the short reconstructions s_i against x_i's own factors:
                        what the generator reproduces from an image's own codes, the bound on
                        what a mix can keep (probe_content_factor_error: the probe on real images)
  leak_class_from_content_acc   held-out accuracy of a linear (logistic) probe predicting the
                        class from content codes; chance (1/C, leak_class_chance) is best
  leak_factors_from_class_r2    synthetic only: held-out R^2 (clipped at 0, averaged over
                        factors) of a ridge probe predicting the content factors from class codes
Probes follow a fixed recipe and seed; the image probes are cached per dataset identity.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import probes as P
from .data.synthetic import SHAPE_FACTOR_NAMES, TEXTURES
from .metrics_table import ROWS, fmt_value, format_table  # noqa: F401 (re-exported: the CLI's table)
from .reference.g2g import g2g_forward, mean_class_code

CONTENT_FACTORS = ["cx", "cy", "scale", "background", "light"]   # rotation: see factor_targets
SHAPE_CONTENT_FACTORS = CONTENT_FACTORS + ["hue", "texture"]     # the shape family's (data/synthetic.py)
TEXTURE_CHANCE_ERROR = 1 - 1 / len(TEXTURES)  # misclassification rate of a guess unrelated to the image
METRIC_KEYS = ["recon_short_l1", "recon_short_psnr", "recon_long_l1", "recon_long_psnr",
               "swap_acc", "swap_acc_m1", "swap_acc_m2", "swap_kept_acc", "swap_chance", "probe_class_acc",
               "content_error", "probe_content_error", "content_mae", "probe_content_mae",
               "content_factor_error", "content_error_to_class", "content_factor_error_to_class",
               "recon_short_factor_error", "probe_content_factor_error",
               "leak_class_from_content_acc", "leak_class_chance", "leak_factors_from_class_r2",
               "leak_factors_from_class_r2_per_factor"]
PSNR_CAP = 100.0


# ---- data ---------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    x: torch.Tensor                       # (N, 3, S, S) in [-1, 1]
    y: torch.Tensor                       # (N,) int64 labels
    factors: torch.Tensor | None = None   # (N, 6) or, shape family, (N, 8): SyntheticDataset.factors

    def __len__(self):
        return len(self.y)

    def subset(self, idx):
        return ImageSet(self.x[idx], self.y[idx], None if self.factors is None else self.factors[idx])


def load_set(ds, indices) -> ImageSet:
    """Images (evaluation transform), labels and, when the dataset has them, factors."""
    indices = [int(i) for i in indices]
    x = torch.stack([ds.get(i, None)[0] for i in indices])
    y = torch.tensor([ds.labels[i] for i in indices], dtype=torch.int64)
    f = torch.stack([ds.factors(i) for i in indices]) if hasattr(ds, "factors") else None
    return ImageSet(x, y, f)


def spread_indices(labels, n: int, seed: int) -> list[int]:
    """Up to n indices, a seeded permutation taken round-robin over classes (balanced)."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(labels), generator=g).tolist():
        by_class.setdefault(int(labels[i]), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    out, k = [], 0
    while len(out) < min(n, len(labels)):
        q = queues[k % len(queues)]
        if k // len(queues) < len(q):
            out.append(q[k // len(queues)])
        k += 1
    return out


def pair_indices(labels: torch.Tensor, n_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n_pairs (i1, i2) with different labels, deterministic from seed."""
    g = torch.Generator().manual_seed(seed + 1)
    n = len(labels)
    if len(torch.unique(labels)) < 2:
        raise ValueError("evaluation needs held-out images of at least 2 classes")
    i1, i2 = [], []
    while len(i1) < n_pairs:
        a, b = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
        ok = labels[a] != labels[b]
        i1 += a[ok].tolist()
        i2 += b[ok].tolist()
    return torch.tensor(i1[:n_pairs]), torch.tensor(i2[:n_pairs])


def kshot_indices(labels: torch.Tensor, idx: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """(n, k) indices: row r is idx[r] and k-1 other images of its class, deterministic from seed."""
    check_k_shot(labels[idx], labels, k)
    g = torch.Generator().manual_seed(seed + 5)
    by_class = {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}
    rows = []
    for i in idx.tolist():
        others = by_class[int(labels[i])][by_class[int(labels[i])] != i]
        rows.append(torch.cat([torch.tensor([i]), others[torch.randperm(len(others), generator=g)[:k - 1]]]))
    return torch.stack(rows)


def check_k_shot(used: torch.Tensor, labels: torch.Tensor, k: int) -> None:
    """Every class in `used` has at least k images in `labels` (the held-out set), else ValueError."""
    counts = torch.bincount(labels)
    short = [c for c in torch.unique(used).tolist() if counts[c] < k]
    if short:
        raise ValueError(f"--k-shot {k}: class {short[0]} has only {int(counts[short[0]])} held-out images; lower "
                         f"--k-shot or raise --samples (held out: 2 x --samples images, at least 64, over all classes)")


# ---- synthetic factors --------------------------------------------------------------------------

def has_hue_texture(f: torch.Tensor) -> bool:
    """Factors of the shape family (hue and texture after the six)? Their number says: the factor
    set follows the dataset without a flag to pass along."""
    return f.shape[1] == len(SHAPE_FACTOR_NAMES)


def content_factors(f: torch.Tensor) -> list[str]:
    """The scored factors of SyntheticDataset factors `f`: CONTENT_FACTORS or SHAPE_CONTENT_FACTORS."""
    return SHAPE_CONTENT_FACTORS if has_hue_texture(f) else CONTENT_FACTORS


def target_names(f: torch.Tensor) -> list[str]:
    """Names of the factor_targets columns (the leakage R^2 per target)."""
    names = ["cx", "cy", "scale", "background", "light_cos", "light_sin"]
    if has_hue_texture(f):
        names += ["hue_cos", "hue_sin"] + [f"texture_{t}" for t in TEXTURES]
    return names


def factor_targets(f: torch.Tensor) -> torch.Tensor:
    """SyntheticDataset factors (cx, cy, scale, rotation, background, light) -> regression targets
    (cx, cy, scale, background, cos light, sin light). Rotation is left out: the shapes' symmetries
    (a circle has none to see) make it unidentifiable from the image for many classes. The shape
    family's (.., hue, texture) add cos/sin of the hue angle and the texture one-hot (4 columns):
    the same regressor scores a category, read back by argmax."""
    light = f[:, 5]
    cols = [f[:, 0], f[:, 1], f[:, 2], f[:, 4], torch.cos(light), torch.sin(light)]
    if has_hue_texture(f):
        hue = 2 * math.pi * f[:, 6]
        cols += [torch.cos(hue), torch.sin(hue)]
        cols += F.one_hot(f[:, 7].long(), len(TEXTURES)).to(f.dtype).unbind(1)
    return torch.stack(cols, 1)


def _angle_error(cos, sin, angle):
    d = torch.atan2(sin, cos) - angle
    return torch.atan2(torch.sin(d), torch.cos(d)).abs()


def factor_abs_errors(pred_t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """(N, K) absolute errors in factor units, order content_factors(f) (light: angle, radians;
    hue: circular, in turns, at most 0.5; texture: 1 where the argmax is the wrong texture)."""
    t = factor_targets(f)
    lin = (pred_t[:, :4] - t[:, :4]).abs()
    errs = [lin, _angle_error(pred_t[:, 4], pred_t[:, 5], f[:, 5])[:, None]]
    if has_hue_texture(f):
        errs.append(_angle_error(pred_t[:, 6], pred_t[:, 7], 2 * math.pi * f[:, 6])[:, None] / (2 * math.pi))
        errs.append((pred_t[:, 8:].argmax(1) != f[:, 7].long()).to(lin.dtype)[:, None])
    return torch.cat(errs, 1)


def factor_scales(f: torch.Tensor) -> torch.Tensor:
    """Std of each content_factors(f) entry over a reference set (light: the std of a uniform angle;
    hue: of a uniform hue; texture: chance's misclassification rate, so ~1 is an unrelated image)."""
    s = f[:, [0, 1, 2, 4]].std(0, unbiased=False)
    fixed = [math.pi / math.sqrt(3)]
    if has_hue_texture(f):
        fixed += [1 / math.sqrt(12), TEXTURE_CHANCE_ERROR]
    return torch.cat([s, torch.tensor(fixed)])


# ---- probes -------------------------------------------------------------------------------------

class Probes:
    """The image probes: a class classifier and (synthetic data) a factor regressor."""

    def __init__(self, classifier, regressor=None, t_mean=None, t_std=None, scales=None):
        self.classifier, self.regressor = classifier, regressor
        self.t_mean, self.t_std, self.scales = t_mean, t_std, scales

    def classify(self, x):
        return self.classifier.predict(x).argmax(1)

    def regress(self, x):
        """-> factor targets (see factor_targets), de-standardised."""
        return self.regressor.predict(x) * self.t_std + self.t_mean


def build_probes(train: ImageSet, identity: dict | None = None, cache_dir: str | os.PathLike | None = None,
                 seed: int = 0, log=None, steps: int = P.PROBE_STEPS) -> Probes:
    """Train (or load from `cache_dir`) the probes on `train`. `identity` names the data (cache key);
    `cache_dir=None` disables the cache."""
    def get(kind, target, extra_fn):
        path = None
        if cache_dir is not None and identity is not None:
            key = P.cache_key({**identity, "kind": kind, "seed": seed, "n": len(train), "steps": steps})
            path = Path(cache_dir) / f"{kind}_{key}.pt"
            hit = P.load_cached(path)
            if hit is not None:
                return hit
        t0 = time.time()
        probe = P.train_image_probe(train.x, target, "class" if kind == "class" else "regress", seed=seed,
                                     steps=steps)
        extra = extra_fn()
        if log:
            log(f"trained the {kind} probe on {len(train)} images in {time.time() - t0:.1f}s")
        if path is not None:
            P.save_cached(path, probe, extra)
        return probe, extra

    classifier, _ = get("class", train.y, dict)
    if train.factors is None:
        return Probes(classifier)
    t = factor_targets(train.factors)
    t_mean, t_std = t.mean(0), t.std(0, unbiased=False).clamp(min=1e-6)
    regressor, extra = get("factors", (t - t_mean) / t_std,
                           lambda: {"t_mean": t_mean, "t_std": t_std, "scales": factor_scales(train.factors)})
    return Probes(classifier, regressor, extra["t_mean"], extra["t_std"], extra["scales"])


# ---- metrics (pure functions of a model with encode_content / encode_class / decode) ------------

@torch.no_grad()
def run_pairs(model, x1: torch.Tensor, x2: torch.Tensor, batch: int = 32, device="cpu", class_codes=None) -> dict:
    """Both G2G stages plus the short reconstructions over all pairs, in batches -> CPU tensors.
    `class_codes` (b1, b2): stage 1's class codes instead of E_B(x1), E_B(x2) (K-shot)."""
    keys = ("m1", "m2", "s1", "s2", "r1", "r2", "a1", "a2", "b1", "b2")
    parts: dict[str, list] = {k: [] for k in keys}
    for i in range(0, len(x1), batch):
        codes = None if class_codes is None else tuple(b[i:i + batch].to(device) for b in class_codes)
        o = g2g_forward(model, x1[i:i + batch].to(device), x2[i:i + batch].to(device), short=True,
                        class_codes=codes)
        for k in keys:
            parts[k].append(getattr(o, k).float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def encode_all(model, x: torch.Tensor, batch: int = 64, device="cpu"):
    a, b = [], []
    for i in range(0, len(x), batch):
        xi = x[i:i + batch].to(device)
        a.append(model.encode_content(xi).float().cpu())
        b.append(model.encode_class(xi).float().cpu())
    return torch.cat(a), torch.cat(b)


def l1_psnr(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    d = (pred.float().clamp(-1, 1) - target.float()).flatten(1)
    mse = (d * d).mean(1)
    psnr = (10 * torch.log10(4.0 / mse.clamp(min=1e-30))).clamp(max=PSNR_CAP)
    return d.abs().mean().item(), psnr.mean().item()


def reconstruction_metrics(out: dict, x1, x2) -> dict:
    x = torch.cat([x1, x2])
    s_l1, s_psnr = l1_psnr(torch.cat([out["s1"], out["s2"]]), x)
    r_l1, r_psnr = l1_psnr(torch.cat([out["r1"], out["r2"]]), x)
    return {"recon_short_l1": s_l1, "recon_short_psnr": s_psnr, "recon_long_l1": r_l1, "recon_long_psnr": r_psnr}


def swap_metrics(probes: Probes, out: dict, y1, y2, num_classes: int) -> dict:
    p1, p2 = probes.classify(out["m1"]), probes.classify(out["m2"])
    a1, a2 = (p1 == y2).float().mean().item(), (p2 == y1).float().mean().item()
    kept = torch.cat([p1 == y1, p2 == y2]).float().mean().item()
    return {"swap_acc": (a1 + a2) / 2, "swap_acc_m1": a1, "swap_acc_m2": a2, "swap_kept_acc": kept,
            "swap_chance": 1.0 / num_classes}


def content_error(probes: Probes, images: torch.Tensor, factors: torch.Tensor) -> tuple[float, dict]:
    """-> (mean standardised error, per-factor MAE in factor units) of the probe on `images`
    against the ground-truth `factors`."""
    mean, mae, _ = factor_errors(probes, probes.regress(images), factors)
    return mean, mae


def factor_errors(probes: Probes, pred_t: torch.Tensor, factors: torch.Tensor) -> tuple[float, dict, dict]:
    """Regressed factors `pred_t` against `factors` -> (mean standardised error, per-factor MAE in
    factor units, per-factor standardised error)."""
    mae = factor_abs_errors(pred_t, factors).mean(0)
    std_units = mae / probes.scales
    names = content_factors(factors)
    return std_units.mean().item(), dict(zip(names, mae.tolist())), dict(zip(names, std_units.tolist()))


def leakage_metrics(train_codes, train: ImageSet, test_codes, test: ImageSet, num_classes: int,
                    seed: int = 0) -> dict:
    """Linear probes fitted on the codes of training images, scored on held-out ones."""
    (ta, tb), (ea, eb) = train_codes, test_codes
    fa, ga = P.code_features(ta, seed), P.code_features(ea, seed)
    predict = P.fit_logistic(fa, train.y, num_classes)
    res = {"leak_class_from_content_acc": (predict(ga) == test.y).float().mean().item(),
           "leak_class_chance": 1.0 / num_classes,
           "leak_factors_from_class_r2": None, "leak_factors_from_class_r2_per_factor": None}
    if train.factors is not None and test.factors is not None:
        fb, gb = P.code_features(tb, seed), P.code_features(eb, seed)
        ytr, yte = factor_targets(train.factors).double(), factor_targets(test.factors).double()
        pred = P.fit_ridge(fb, ytr)(gb)
        r2 = 1 - ((pred - yte) ** 2).sum(0) / ((yte - yte.mean(0)) ** 2).sum(0).clamp(min=1e-12)
        r2 = r2.clamp(min=0)
        res["leak_factors_from_class_r2"] = r2.mean().item()
        res["leak_factors_from_class_r2_per_factor"] = dict(zip(target_names(train.factors), r2.tolist()))
    return res


def evaluate_model(model, train: ImageSet, heldout: ImageSet, probes: Probes, num_classes: int, *,
                   samples: int = 256, seed: int = 0, batch: int = 32, device="cpu",
                   leak_train: int = 1024, k_shot: int = 1) -> dict:
    """All metrics of `model` (encode_content / encode_class / decode) -> flat dict (METRIC_KEYS).

    train: real training images (for the leakage probes); heldout: images the pairs come from.
    k_shot > 1: stage 1's class codes are K-shot means (`kshot_indices`; see the module docstring)."""
    i1, i2 = pair_indices(heldout.y, samples, seed)
    s1, s2 = heldout.subset(i1), heldout.subset(i2)
    class_codes = None
    if k_shot > 1:
        _, codes = encode_all(model, heldout.x, batch * 2, device)
        class_codes = tuple(mean_class_code(codes[kshot_indices(heldout.y, i, k_shot, seed + j)])
                            for j, i in enumerate((i1, i2)))
    out = run_pairs(model, s1.x, s2.x, batch, device, class_codes)
    m = reconstruction_metrics(out, s1.x, s2.x)
    m.update(swap_metrics(probes, out, s1.y, s2.y, num_classes))
    m["probe_class_acc"] = (probes.classify(heldout.x) == heldout.y).float().mean().item()
    if probes.regressor is not None and heldout.factors is not None:
        pred = probes.regress(torch.cat([out["m1"], out["m2"]]))
        own, other = torch.cat([s1.factors, s2.factors]), torch.cat([s2.factors, s1.factors])
        m["content_error"], m["content_mae"], m["content_factor_error"] = factor_errors(probes, pred, own)
        m["content_error_to_class"], _, m["content_factor_error_to_class"] = factor_errors(probes, pred, other)
        # What bounds the mixes: the short reconstructions' own factors (a factor the generator
        # does not reproduce from its own codes cannot follow the content image in a mix) and the
        # probe's per-factor error on real images.
        short = probes.regress(torch.cat([out["s1"], out["s2"]]))
        m["recon_short_factor_error"] = factor_errors(probes, short, own)[2]
        m["probe_content_error"], m["probe_content_mae"], m["probe_content_factor_error"] = factor_errors(
            probes, probes.regress(heldout.x), heldout.factors)
    else:
        m.update(content_error=None, content_mae=None, probe_content_error=None, probe_content_mae=None,
                 content_factor_error=None, content_error_to_class=None, content_factor_error_to_class=None,
                 recon_short_factor_error=None, probe_content_factor_error=None)
    lt = train.subset(torch.tensor(spread_indices(train.y, leak_train, seed + 2)))
    # held-out codes: every held-out image once (codes of x1 and x2 would repeat images)
    m.update(leakage_metrics(encode_all(model, lt.x, batch * 2, device), lt,
                             encode_all(model, heldout.x, batch * 2, device), heldout, num_classes, seed))
    return {k: m[k] for k in METRIC_KEYS}
