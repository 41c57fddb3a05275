"""FID and KID of the mixes per target class (issue 24 #11), as FUNIT / COCO-FUNIT report FID of
translations per target class and StyleGAN reports FID and KID.

For each class c of the held-out images: mixes G(E_A(x), E_B(y)) with y a held-out image of class c
(the mean of K of them with --k-shot K) and x a held-out image of another class, against the real
held-out images of class c; FID and KID per class and their mean over the classes (FUNIT's mFID).

Features: torch-fidelity's InceptionV3 (`FeatureExtractorInceptionV3`, pool layer '2048', the
features FID and KID are defined on) built from a weight file given by path; nothing downloads. A
file written by `write_random_extractor` holds a small random-weight conv net instead: the tests
run the same code path with it (its numbers are no FID to compare with anyone's). The formulas
are torch-fidelity 0.4's (metric_fid.py, metric_kid.py, defaults.py), in float64, here so they run
without torch-fidelity (whose package import needs a torchvision matching torch).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .reference.g2g import mean_class_code
from .torch_files import safe_torch_load

INSTALL = 'pip install "g2g-fast[fidelity]"'
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub's file-name tag: the start of the file's sha256
INCEPTION_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight")
RANDOM_FORMAT = "g2g-fast random-conv feature extractor"
# torch-fidelity 0.4's defaults, so that our KID is its KID
KID_SUBSETS, KID_SUBSET_SIZE, KID_DEGREE, KID_COEF0, KID_RNG_SEED = 100, 1000, 3, 1.0, 2020
MIN_IMAGES = 2  # per class and side: a covariance (FID) and the unbiased MMD (KID) need two
SCALAR_KEYS = ("fid_mean", "kid_mean")
KEYS = SCALAR_KEYS + ("fid_per_class", "kid_per_class", "kid_std_per_class")


class FidelityError(ValueError):
    """Bad FID/KID input (a weight file, a count): one `error:` line, exit code 2."""


# ---- the formulas (torch-fidelity's, float64) -----------------------------------------------------

def fid_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean, covariance with N - 1), float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)); the trace of the square root as the sum
    of the square roots of the eigenvalues of S1 S2 (real parts), as torch-fidelity: no sqrtm,
    which fails on the singular covariances of a few images."""
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype("complex128")).real)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(features_1, features_2) -> float:
    return fid_from_statistics(*fid_statistics(features_1), *fid_statistics(features_2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x.y / D + 1)^3: KID's kernel."""
    return (x @ y.T / x.shape[1] + KID_COEF0) ** KID_DEGREE


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    m = k_xx.shape[0]
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(features_1, features_2, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = KID_RNG_SEED) -> tuple[float, float]:
    """-> (mean, std) over `subsets` random subsets of min(subset_size, N1, N2) images a side of the
    unbiased MMD^2 with the polynomial kernel. The subsets are drawn as torch-fidelity draws them
    (the same RandomState calls), so the same features give its numbers."""
    f1, f2 = np.asarray(features_1, dtype=np.float64), np.asarray(features_2, dtype=np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < MIN_IMAGES:
        raise FidelityError(f"KID needs at least {MIN_IMAGES} images a side, got {len(f1)} and {len(f2)}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        a = f1[rng.choice(len(f1), m, replace=False)]
        b = f2[rng.choice(len(f2), m, replace=False)]
        mmds[i] = mmd2_unbiased(polynomial_kernel(a, a), polynomial_kernel(a, b), polynomial_kernel(b, b))
    return float(mmds.mean()), float(mmds.std())


# ---- feature extractors: uint8 images in, (N, D) features out ---------------------------------------

class RandomConvFeatures(nn.Module):
    """The tests' stand-in for InceptionV3: the same uint8 input, resized to a fixed size as
    Inception resizes to 299, three random-weight convolutions, the spatial mean."""
    SIZE = 32

    def __init__(self, dim: int = 32, width: int = 16):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, 2, 1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.c3 = nn.Conv2d(2 * width, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float() / 127.5 - 1, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False)
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.c3(x).mean((2, 3))


def write_random_extractor(path: str | os.PathLike, dim: int = 32, width: int = 16, seed: int = 0) -> Path:
    """Write a RandomConvFeatures weight file for --fid-weights (tests, smoke runs)."""
    net, g = RandomConvFeatures(dim, width), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 10.0
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": RANDOM_FORMAT, "dim": dim, "width": width, "state_dict": net.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> uint8 pixels, as the PNGs are written (samples.to_uint8)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Extractor:
    """A feature network (uint8 (N, 3, H, W) -> (N, D)) and what it is."""

    def __init__(self, net: nn.Module, name: str, dim: int, path: str, comparable: bool, notes=()):
        self.net, self.name, self.dim, self.path = net.eval().requires_grad_(False), name, dim, path
        self.comparable, self.notes = comparable, list(notes)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 32, device="cpu") -> np.ndarray:
        """Images in [-1, 1] -> (N, D) float64."""
        self.net.to(device)
        out = []
        for i in range(0, len(images), batch):
            f = self.net(to_uint8(images[i:i + batch]).to(device))
            out.append((f[0] if isinstance(f, tuple) else f).double().cpu())  # torch-fidelity: a tuple
        return torch.cat(out).numpy()


def _inception(path: Path, flag: str) -> nn.Module:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:  # not installed, or torchvision built for another torch (a RuntimeError)
        why = "is not installed" if isinstance(e, ModuleNotFoundError) and (e.name or "").startswith("torch_fidelity") \
            else f"does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        raise FidelityError(f"{flag} {path}: InceptionV3 features need torch-fidelity, which {why}: {INSTALL}, with "
                            f"a torchvision built for torch {torch.__version__}") from None
    try:
        # It loads the file again, with weights_only=False: safe, as safe_torch_load has just read these
        # bytes with weights_only=True (so they name no Python object beyond tensors to build).
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except RuntimeError as e:  # load_state_dict: other keys or shapes, listed over many lines
        why = " ".join(str(e).split()).split(": ", 1)[-1]
        raise FidelityError(f"{flag} {path}: not torch-fidelity's InceptionV3 weights ({INCEPTION_FILE}): "
                            f"{why[:160]}{'...' if len(why) > 160 else ''}") from None


def load_extractor(path: str | os.PathLike, flag: str = "--fid-weights") -> Extractor:
    """The feature extractor of a weight file: torch-fidelity's InceptionV3 weights, or a file of
    `write_random_extractor`. FidelityError (one line) for a missing or foreign file."""
    path = Path(path)
    if not path.exists():
        raise FidelityError(f"{flag} {path}: no such file; download torch-fidelity's InceptionV3 weight file once, "
                            f"{INCEPTION_URL} (docs/evaluation.md, FID and KID): nothing downloads at run time")
    obj = safe_torch_load(path, what="feature extractor weight file", flag=flag)
    if isinstance(obj, dict) and obj.get("format") == RANDOM_FORMAT:
        net = RandomConvFeatures(int(obj["dim"]), int(obj["width"]))
        try:
            net.load_state_dict(obj["state_dict"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise FidelityError(f"{flag} {path}: a damaged random extractor file ({str(e).splitlines()[0]})") from None
        return Extractor(net, f"random-conv-{obj['dim']} (test extractor)", int(obj["dim"]), str(path), False,
                         ["random-weight test extractor: these numbers check the code path; they are no FID or "
                          "KID to compare with published ones"])
    if not (isinstance(obj, dict) and all(k in obj for k in INCEPTION_KEYS)):
        raise FidelityError(f"{flag} {path}: neither torch-fidelity's InceptionV3 weights ({INCEPTION_FILE}) nor a "
                            f"g2g_fast.fidelity.write_random_extractor file")
    del obj
    net = _inception(path, flag)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    notes = [] if h.hexdigest().startswith(INCEPTION_SHA256_PREFIX) else [
        f"{path}: InceptionV3 weights of another sha256 than {INCEPTION_FILE}'s ({h.hexdigest()[:8]}...): the "
        f"numbers are not comparable with published FIDs"]
    return Extractor(net, "inception-v3-compat (torch-fidelity, pool 2048)", 2048, str(path), not notes, notes)


# ---- per target class -----------------------------------------------------------------------------

def check_heldout(labels: torch.Tensor, k_shot: int = 1) -> None:
    """Enough held-out images per class for per-class FID/KID, else FidelityError."""
    counts = torch.bincount(labels)
    present = [c for c in range(len(counts)) if counts[c] > 0]
    if len(present) < 2:
        raise FidelityError("FID/KID per target class needs held-out images of at least 2 classes")
    need = max(MIN_IMAGES, k_shot)
    short = [c for c in present if counts[c] < need]
    if short:
        raise FidelityError(f"--fid-weights: class {short[0]} has {int(counts[short[0]])} held-out image(s), FID/KID "
                            f"per class need {need}; raise --samples (held out: 2 x --samples images, at least 64, "
                            f"over all classes)")


def _cycle(pool: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n entries of `pool`, each seeded permutation used whole before the next (even use)."""
    reps = -(-n // len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(reps)])[:n]


@torch.no_grad()
def mix_features(model, x: torch.Tensor, content: torch.Tensor, shots: torch.Tensor, extractor: Extractor,
                 batch: int = 32, device="cpu") -> np.ndarray:
    """Features of G(E_A(x[content]), mean over K of E_B(x[shots])) (shots: (n, K) indices)."""
    out, k = [], shots.shape[1]
    for i in range(0, len(content), batch):
        xc = x[content[i:i + batch]].to(device)
        codes = model.encode_class(x[shots[i:i + batch].flatten()].to(device))
        b = codes if k == 1 else mean_class_code(codes.view(len(xc), k, *codes.shape[1:]))
        out.append(extractor.features(model.decode(model.encode_content(xc), b).float().cpu(), batch, device))
    return np.concatenate(out)


def per_class(model, held, extractor: Extractor, *, samples: int | None = None, k_shot: int = 1, seed: int = 0,
              batch: int = 32, device="cpu", log=None) -> tuple[dict, dict]:
    """-> (metrics {KEYS}, info). `held`: an ImageSet (x in [-1, 1], y); per target class c,
    `samples` mixes (default: as many as the real held-out images of c) against those real images.
    `log`: where the warnings (info["notes"]) go; None: nowhere."""
    check_heldout(held.y, k_shot)
    g = torch.Generator().manual_seed(seed + 11)
    real = extractor.features(held.x, batch, device)
    fids, kids, stds, n_real, n_fake, sizes = {}, {}, {}, {}, {}, {}
    for c in torch.unique(held.y).tolist():
        own, others = torch.nonzero(held.y == c).flatten(), torch.nonzero(held.y != c).flatten()
        n = samples or len(own)
        shots = _cycle(own, n, g)[:, None] if k_shot == 1 else \
            torch.stack([own[torch.randperm(len(own), generator=g)[:k_shot]] for _ in range(n)])  # K different
        fake = mix_features(model, held.x, _cycle(others, n, g), shots, extractor, batch, device)
        key = str(c)
        fids[key] = fid(fake, real[own.numpy()])
        kids[key], stds[key] = kid(fake, real[own.numpy()])
        n_real[key], n_fake[key], sizes[key] = len(own), n, min(KID_SUBSET_SIZE, n, len(own))
    notes = list(extractor.notes)
    if min(n_real.values()) < extractor.dim:
        notes.append(f"FID from {min(n_real.values())} real images per class, fewer than the {extractor.dim} feature "
                     f"dimensions: the covariances are rank-deficient and FID is biased upward by an amount that "
                     f"depends on the image counts, so compare FIDs only at equal counts; KID's estimate is "
                     f"unbiased at any count (its spread over subsets, kid_std_per_class, shrinks with more "
                     f"images) and is the one to read here")
    for note in notes if log else []:
        log(f"warning: {note}")
    metrics = {"fid_mean": float(np.mean(list(fids.values()))), "kid_mean": float(np.mean(list(kids.values()))),
               "fid_per_class": fids, "kid_per_class": kids, "kid_std_per_class": stds}
    info = {"extractor": extractor.name, "weights": extractor.path, "feature_dim": extractor.dim,
            "comparable": extractor.comparable, "classes": len(fids), "k_shot": k_shot, "seed": seed,
            "n_real": n_real, "n_fake": n_fake, "kid_subsets": KID_SUBSETS, "kid_subset_size": sizes,
            "kid_rng_seed": KID_RNG_SEED, "notes": notes}
    return metrics, info


# ---- the CLIs (evaluate, ablate) ----------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--fid-weights", metavar="PATH",
                   help=f"also FID and KID of the mixes per target class, with the InceptionV3 weights at PATH "
                        f"(torch-fidelity's {INCEPTION_FILE}; {INSTALL}; nothing downloads)")
    p.add_argument("--fid-samples", type=int, metavar="N",
                   help="mixes per target class for FID/KID (default: as many as the class's real held-out images)")


def from_args(args, labels: torch.Tensor | None = None, k_shot: int = 1) -> Extractor | None:
    """--fid-weights / --fid-samples -> the extractor, or None when FID is not asked for; checks
    the held-out `labels` when given. FidelityError for bad input."""
    if args.fid_weights is None:
        if args.fid_samples is not None:
            raise FidelityError("--fid-samples needs --fid-weights PATH (the InceptionV3 weights; docs/evaluation.md)")
        return None
    if args.fid_samples is not None and args.fid_samples < 1:
        raise FidelityError(f"--fid-samples must be a positive integer, got {args.fid_samples}")
    extractor = load_extractor(args.fid_weights)
    if labels is not None:
        check_heldout(labels, k_shot)
    return extractor


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def table_rows(metrics: dict, shown: int = 8) -> list[str]:
    """evaluate's table rows (none without FID): the mean over classes, then the first classes."""
    if metrics.get("fid_mean") is None:
        return []
    rows = []
    for name, key in (("FID", "fid"), ("KID", "kid")):
        per = metrics[f"{key}_per_class"]
        listed = ", ".join(f"{c}: {_fmt(v)}" for c, v in list(per.items())[:shown])
        more = f", ... ({len(per)} classes in the JSON)" if len(per) > shown else ""
        rows.append(f"| {name} of mixes vs real images of their target class | mean over classes / per class | "
                    f"{_fmt(metrics[f'{key}_mean'])} / {listed}{more} |")
    return rows


def report_lines(report: dict) -> list[str]:
    """ablate's FID/KID table (none unless a variant has FID): per variant the means over classes,
    mean ± sample std over the seeds."""
    rows = {v: e for v, e in report["variants"].items() if (e.get("metrics") or {}).get("fid_mean") is not None}
    if not rows:
        return []
    info = report.get("fidelity") or {}

    def cell(e, key):
        s = (e.get("stats") or {}).get(key)
        value = e["metrics"][key]
        return _fmt(value) + (f" ± {_fmt(s['std'])}" if s and s.get("std") is not None else "")

    lines = ["", f"FID and KID of the mixes against the real held-out images of their target class, mean over the "
                 f"{info.get('classes')} classes (lower is better; per class in ablation.json; features: "
                 f"{info.get('extractor')}; cells: mean ± sample std over the seeds).", "",
             "| variant | FID | KID |", "|---|---|---|"]
    lines += [f"| {v} | {cell(e, 'fid_mean')} | {cell(e, 'kid_mean')} |" for v, e in rows.items()]
    lines += [f"Note: {n}." for n in info.get("notes") or []]
    return lines
