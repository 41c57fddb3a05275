"""The peak memory a setting needs, estimated from its config before anything is allocated (issue 24).

`train`, `translate` and `evaluate` compare it with the memory free on the device they will use and
refuse a setting that cannot fit with one line (`check`), instead of being killed by the kernel's
OOM killer halfway through allocating (exit 137, no message) or failing with a traceback.

The estimate is a formula, not a trial allocation: every network is a table of the feature maps
its convolutions produce (channels, downsampling factor), read from the config (nf, n_downs_*,
n_res_blks, dis_nf, ...). A map of c channels at factor f holds c * (S / f)**2 values per image of
size S. Training keeps the maps of every pass of the G2G step for the backward (`train_values`:
both stages of G, D on what G's loss judges); inference holds about two neighbouring maps at a time.
Each sum is multiplied by a factor calibrated against the peak resident memory of real runs on the
CPU (reference backend, fp32; tests/test_memory_estimate.py measures it): the conv outputs are not
all there is, as padding, instance norm and activations each keep a tensor of the same size. On top:
weights, gradients, EMA and optimiser state, and the images themselves (batches, sample pairs,
evaluation sets). The fast backend's fused kernels keep less, so on a GPU the estimate errs high.

`G2G_NO_MEMORY_CHECK=1` skips the check (for an estimate that is wrong for your setting).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from .free_memory import device_free, host_free
from .options import UsageError

# Calibration, from the peak resident memory of real steps on the CPU (reference backend, fp32,
# paper and cpu-preset widths, 64 to 256 px; tests/test_memory_estimate.py measures it again): the
# multiple of the conv outputs' values that a training step keeps (the padded inputs, the norms' and
# activations' tensors, the backward's gradients in flight: 2.6 to 3.4 x), and of the largest two
# neighbouring maps that an inference forward holds at once (its peak: about 2.6 x).
TRAIN_FACTOR = {"funit2funit": 2.7, "cyclefunit": 3.3, "naive": 3.2}
INFER_FACTOR = 2.6
IDENTITY_VALUES = 25e6  # ResNet-50 at its fixed 224 x 224 input: the saved values per image
TRAINER_RUNTIME = 0.25e9  # what the trainer's process holds beyond torch's import at any size (measured)


@dataclass
class Estimate:
    """Bytes by part ("activations", "weights ...", "images"); `total` is their sum."""
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = sorted(((v, k) for k, v in self.parts.items() if v >= 0.01 * self.total), reverse=True)
        return ", ".join(f"{k} {human(v)}" for v, k in shown)


def human(n: float) -> str:
    """Decimal units, as disks and `free -H` count: '20.1 GB', '1.2 TB'; 'more than 1000 EB' past that."""
    if not math.isfinite(n) or n >= 1e21:
        return "more than 1000 EB"
    for unit, scale in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


# ---- feature-map tables: [(channels, downsampling factor)] in forward order ----------------------

def funit_content_encoder(nf, downs, n_res, code_dim=0):
    maps = [(nf, 1)] + [(nf * 2 ** i, 2 ** i) for i in range(1, downs + 1)]
    maps += [(nf * 2 ** downs, 2 ** downs)] * (2 * n_res)
    return maps + ([(code_dim, 2 ** downs)] if code_dim else [])


def funit_class_encoder(nf, downs):
    return [(nf, 1), (2 * nf, 2), (4 * nf, 4)] + [(4 * nf, 2 ** (2 + j)) for j in range(1, downs - 1)]


def funit_decoder(nf, ups, n_res, code_dim=0):
    dim, f = nf * 2 ** ups, 2 ** ups
    maps = ([(dim, f)] if code_dim else []) + [(dim, f)] * (2 * n_res)
    for _ in range(ups):
        f //= 2
        maps += [(dim, f), (dim // 2, f)]  # the nearest upsample, then its 5x5 conv
        dim //= 2
    return maps + [(3, 1)]


def funit_discriminator(nf, n_res):
    maps, f = [(nf, 1)], 1
    for stage in range(n_res // 2):
        out = min(2 * nf, 1024)
        maps += [(nf, f)] * 3 + [(out, f)] * 2  # ActFirstResBlocks (nf, nf), (nf, out) with conv_s
        if stage < n_res // 2 - 1:
            maps.append((out, 2 * f))  # pad + 3x3 average pool, stride 2
            f *= 2
        nf = out
    return maps


def patch_discriminator(nf):
    return [(nf, 2), (2 * nf, 4), (4 * nf, 8), (8 * nf, 8), (1, 8)]


def naive_encoder():
    return [(w, 2 ** (i + 1)) for i, w in enumerate((32, 64, 128, 256, 512))]


def lord_generator(channels):
    maps = [(channels, 16)]
    for f in (8, 4, 2, 1):
        maps += [(channels, f), (channels, f)]  # the nearest upsample, then its 3x3 conv + AdaIN
    return maps + [(64, 1), (3, 1)]


VGG_RELU22 = [(64, 1), (64, 1), (128, 2), (128, 2)]


def values(maps, size: int) -> float:
    """Values per image of the maps at image size `size`."""
    return float(sum(c * max(1, size // f) ** 2 for c, f in maps))


def peak_pair(maps, size: int) -> float:
    """The largest two neighbouring maps of a forward, per image (what inference holds at once)."""
    sizes = [3.0 * size ** 2] + [c * max(1, size // f) ** 2 for c, f in maps]
    return float(max(a + b for a, b in zip(sizes, sizes[1:])))


def networks(cfg) -> dict[str, list]:
    """The feature-map tables of `cfg`'s networks: enc_content, enc_class, dec, dis (may be empty)."""
    if cfg.approach == "naive":
        return {"enc_content": naive_encoder(), "enc_class": naive_encoder(),
                "dec": lord_generator(cfg.gen_channels), "dis": []}
    nets = {"enc_content": funit_content_encoder(cfg.nf, cfg.n_downs_content, cfg.n_res_blks, cfg.content_dim),
            "enc_class": funit_class_encoder(cfg.nf, cfg.n_downs_class),
            "dec": funit_decoder(cfg.nf, cfg.n_downs_content, cfg.n_res_blks, cfg.content_dim)}
    if cfg.approach == "funit2funit":
        nets["dis"] = funit_discriminator(cfg.dis_nf, cfg.dis_n_res_blks)
    else:
        nets["dis"] = patch_discriminator(cfg.patch_nf)
        if cfg.class_encoder == "identity":
            nets["enc_class"] = []
    return nets


# ---- what a step, a forward and the weights hold ------------------------------------------------

def train_values(cfg, size: int) -> float:
    """Values one training step keeps for its backward, in the heavier of its D and G steps."""
    B = cfg.batch_size
    P = B if cfg.pairing == "halves" else 2 * (B - 1)  # images in the step's pairs (x1 and x2)
    v = {name: values(maps, size) for name, maps in networks(cfg).items()}
    enc = v["enc_content"] + v["enc_class"]
    # Both stages encode P images; stage 1 decodes the P mixes (+ P short reconstructions), stage 2 P.
    g = P * (2 * enc + (2 if cfg.approach == "naive" else 3) * v["dec"])
    g += B * getattr(cfg, "class_shots", 0) * v["enc_class"]  # K-shot class codes in training
    d = 0.0
    if cfg.approach == "funit2funit":
        g += 3 * P * v["dis"]  # D on m1, m2, s1, s2, r1, r2, for its feature matching
        d = 3 * P * v["dis"]  # R1's double backward on the reals (about twice a pass), D on the mixes
    elif cfg.approach == "cyclefunit":
        g += P * v["dis"] + (2 * P * values(VGG_RELU22, size) if cfg.vgg_weights else 0)
        g += P * IDENTITY_VALUES * ((2 if cfg.class_encoder == "identity" else 0) + (cfg.delta_identity > 0))
        d = (B + P) * v["dis"]
    return max(g, d)


def inference_values(cfg, size: int, images: int) -> float:
    """Values a no-grad forward of `images` images holds at its peak (both G2G stages)."""
    dec_size = cfg.image_size if cfg.approach == "naive" else size  # LORD's output size is fixed
    nets = networks(cfg)
    worst = max(peak_pair(nets["enc_content"], size), peak_pair(nets["enc_class"], size),
                peak_pair(nets["dec"], dec_size))
    return images * worst


def parameter_counts(cfg, num_classes: int) -> tuple[float, float]:
    """(G's, D's) parameters; FUNIT's networks are built on the meta device (nothing is allocated)."""
    if cfg.approach == "naive":
        return float(_naive_parameters(cfg.image_size, cfg.code_dim, cfg.gen_channels)), 0.0
    from .reference.backend import ReferenceBackend
    nets = ReferenceBackend()
    with torch.device("meta"):
        gen = nets.generator(**cfg.arch_kwargs())
        dis = nets.discriminator(max(2, num_classes), cfg.dis_nf, cfg.dis_n_res_blks) \
            if cfg.approach == "funit2funit" else nets.patch_discriminator(cfg.patch_nf)
    count = lambda m: float(sum(p.numel() for p in m.parameters()))  # noqa: E731
    extra = 23.5e6 if getattr(cfg, "class_encoder", "") == "identity" else 0.0  # ResNet-50 inside G
    return count(gen) + extra, count(dis)


def _naive_parameters(size: int, code: int, ch: int) -> int:
    """NaiveModel's parameters: its FC layers grow with (size / 16)**4, so they are counted, not built."""
    widths = (3, 32, 64, 128, 256, 512)
    k = size // 32
    encoder = sum(a * b * 16 + 2 * b for a, b in zip(widths, widths[1:])) + 512 * code * k * k + 2 * code
    hw = (size // 16) ** 2
    fc = code * hw * 32 + hw * 32 + hw * 32 * hw * 64 + hw * 64 + hw * 64 * hw * ch + hw * ch
    convs = 4 * (ch * ch * 9 + ch) + 4 * (code * 2 * ch + 2 * ch) + ch * 64 * 25 + 64 + 64 * 3 * 49 + 3
    return 2 * encoder + fc + convs


def _bytes_per_value(device: torch.device, precision: str) -> float:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return 4.0 if precision == "fp32" else 2.0


def image_bytes(size: int, n: float = 1) -> float:
    """n images (3, S, S) in float32."""
    return 12.0 * n * float(size) ** 2


MAX_SIZE = 10 ** 7  # beyond this no setting fits anywhere, and the arithmetic would only overflow


def train_estimate(cfg, opts, num_classes: int, n_images: int, device: torch.device) -> Estimate:
    """What `python -m g2g_fast.train` with `cfg` and `opts` needs at its peak (device and host)."""
    S, B = cfg.image_size, cfg.batch_size
    if S > MAX_SIZE:
        return Estimate({"activations": math.inf})
    per = _bytes_per_value(device, opts.precision)
    pairs = min(8, max(2, num_classes))  # the fixed sample pairs (train.sample_pairs)
    act = max(TRAIN_FACTOR[cfg.approach] * per * train_values(cfg, S),  # a step, or the sample grid
              INFER_FACTOR * 4.0 * inference_values(cfg, S, 2 * pairs))
    g, d = parameter_counts(cfg, num_classes)
    states = 1 if cfg.approach == "funit2funit" else 2  # RMSprop's square average; Adam's two moments
    weights = 4.0 * (g * (2 + states + (cfg.ema_beta > 0)) + d * (2 + states))
    workers = opts.workers if opts.workers >= 0 else (0 if device.type == "cpu" else 8)
    shots = 1 + getattr(cfg, "class_shots", 0)
    images = image_bytes(S, B * shots * (1 + 2 * max(1, workers)) + 2 * pairs)  # batches in flight, samples
    if opts.eval_every:  # the evaluator's probe and held-out sets, and its pairs' outputs
        images += image_bytes(S, min(2048, n_images) + 512 + 8 * 128)
    return Estimate({"activations": act, "weights and optimiser state": weights, "images": images,
                     "runtime": TRAINER_RUNTIME})


def inference_estimate(cfg, size: int, images: int, held_images: float) -> Estimate:
    """A no-grad forward of `images` images at `size` (translate, evaluate), with `held_images`
    images kept as float32 (inputs, outputs, evaluation sets)."""
    if size > MAX_SIZE:
        return Estimate({"activations": math.inf})
    act = INFER_FACTOR * 4.0 * inference_values(cfg, size, images)
    g, _ = parameter_counts(cfg, 2)  # the generator, and the file's copy of it read to load it
    return Estimate({"activations": act, "weights": 8.0 * g, "images": image_bytes(size, held_images)})


def check(estimate: Estimate, device: torch.device, setting: str, fix: str) -> None:
    """Raise UsageError when `estimate` cannot fit on `device`: "SETTING needs about X (parts),
    this machine has Y free; FIX". On a GPU the images are counted against host memory, the rest
    against the GPU's."""
    if os.environ.get("G2G_NO_MEMORY_CHECK", "") not in ("", "0"):
        return
    device = torch.device(device)
    if device.type == "cuda":
        on_host = {k: v for k, v in estimate.parts.items() if k == "images"}
        on_gpu = {k: v for k, v in estimate.parts.items() if k != "images"}
        pools = [(Estimate(on_gpu), device_free(device), f"the GPU ({device})"),
                 (Estimate(on_host), host_free(), "the host")]
    else:
        pools = [(estimate, host_free(), "this machine")]
    for need, (free, what), where in pools:
        if need.total > free:
            raise UsageError(f"{setting} needs about {human(need.total)} ({need.describe()}), {where} has "
                             f"{human(free)} {what}; {fix}")


# ---- the CLIs' checks ------------------------------------------------------------------------------

def check_train(cfg, opts, dataset, device) -> None:
    """`train`: refuse before anything is written into --out when the setting cannot fit."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # under torchrun: this rank's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    est = train_estimate(cfg, opts, dataset.num_classes, len(dataset), device)
    check(est, device, f"--image-size {cfg.image_size} with --batch-size {cfg.batch_size} ({cfg.approach})",
          "use a smaller --image-size or --batch-size (docs/training.md, memory)")


def checkpoint_config(path):
    """The approach config of a g2g-fast checkpoint, read memory-mapped (no tensor is loaded)."""
    from .config import config_from_dict
    raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
    return config_from_dict(raw["approach"], raw)


def generator_config(checkpoint=None):
    """The config whose networks `translate`/`evaluate` run: the checkpoint's, else (--funit)
    FUNIT's animal-faces generator, the defaults of funit2funit's config."""
    from .config import config_from_dict
    return checkpoint_config(checkpoint) if checkpoint else config_from_dict("funit2funit")


def check_inference(cfg, size: int, images: int, held_images: float, device, batch: int | None = None,
                    smaller: tuple[str, ...] = ("--batch-size",), doc: str = "docs/inference.md") -> None:
    """`translate`/`evaluate`: refuse when a forward of `images` images at `size` cannot fit;
    `batch`: the --batch-size that bounds it (None: the inputs do), `smaller`: what else to lower."""
    est = inference_estimate(cfg, size, images, held_images)
    flags = ("--image-size",) + (smaller if batch is not None else ())
    lower = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} or {flags[-1]}"
    check(est, device, f"--image-size {size}" + (f" with --batch-size {batch}" if batch is not None else ""),
          f"use a smaller {lower} ({doc}, memory)")


def check_translate(args, size: int, n_contents: int, classes, figure: bool, device) -> None:
    """`translate`: the largest forward it makes and the images it holds, from its outputs' plan
    (the G2G figure: one pair; the table: chunks of whole rows, at most --batch-size per forward)."""
    bs, C = args.batch_size, len(classes)
    if figure:
        images, held = 2, 8.0  # x1, x2, the mixes, the reconstructions; the figure
    elif not (args.grid or args.out_dir):  # --out-mix alone: every content image with the one class
        images, held = min(bs, max(n_contents, len(classes[0].paths))), 2.0 * n_contents
    else:
        rows = min(n_contents, max(1, bs // C))
        images = min(bs, max(rows * C, rows, sum(len(c.paths) for c in classes)))
        held = rows * (1 + C) + ((n_contents + 1) * (C + 1) / 4 if args.grid else 0)  # + the uint8 table
    check_inference(generator_config(args.checkpoint), size, images, held, device,
                    batch=bs if images == bs else None)


def check_evaluate(args, cfg, size: int, device) -> None:
    """`evaluate`: its forwards of --batch-size pairs (encoders over twice that), the probe and
    held-out sets and the pairs' outputs, all float32 images at `size`."""
    held = args.probe_train + max(2 * args.samples, 64) + 8 * args.samples
    check_inference(cfg, size, 2 * args.batch_size, held, device, batch=args.batch_size,
                    smaller=("--batch-size", "--samples", "--probe-train"), doc="docs/training.md")
