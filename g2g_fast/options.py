"""Command-line options of `python -m g2g_fast.train`, presets, and how they resolve.

Precedence, lowest first: the preset (`--preset`, else the one for the device; on --resume, the
checkpoint's own settings) < `--config FILE` < explicit flags < `--set key=value`. Every flag
defaults to None here so that "given on the command line" can be told apart from "default".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from .config import CONFIGS, check_fields, check_value, config_from_dict, parse_field


class UsageError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


@dataclass
class TrainOptions:
    """Trainer settings that are not part of an approach's config."""
    data: str = "synthetic"      # "synthetic" (embedded, no files) or a dataset folder
    data_format: str = "auto"    # auto | folder | celeba (auto: celeba if identity_CelebA.txt exists)
    steps: int = 100_000         # total iterations (one D step + one G step each)
    out: str = "runs/g2g"        # output folder: config, metrics.jsonl, samples/, checkpoints/
    device: str = "auto"         # auto (cuda if available) | cpu | cuda
    precision: str = "auto"      # auto (bf16 with the fast backend on CUDA, else fp32) | fp32 | bf16 | fp16
    backend: str = "auto"        # auto (fast on CUDA, reference on CPU) | reference | fast
    sample_every: int = 1000     # steps between sample grids
    ckpt_every: int = 1000       # steps between checkpoints/last.pt writes
    keep_snapshots: int = 3      # periodic checkpoints/step_*.pt copies kept (0 = none)
    log_every: int = 50          # steps between metrics.jsonl lines / progress lines
    eval_every: int = 0          # steps between evaluations (g2g_fast.evaluate metrics into metrics.jsonl); 0 = off
    nan_policy: str = "stop"     # stop | skip: what a non-finite loss does
    nan_check_every: int = 0     # steps between non-finite checks (a host sync); 0: every step on the
                                 # reference backend, every log_every steps on the fast one
    workers: int = -1            # data-loader worker processes (-1: 0 on CPU, min(8, cores) on CUDA)
    loader: str = "auto"         # auto | torch | dali | gpu-cache (data/select.py says which and why)
    subpixel_decoder: bool = False  # fast backend: the decoder's upsample + 5x5 convs as exact sub-pixel
                                    # phase convs (kernels.upsample_conv); off until measured faster on a GPU
    sync_bn: bool = False        # under torchrun: BatchNorm statistics over all ranks' images (naive approach)
    dist_timeout: float = 600.0  # under torchrun: seconds a collective waits for the other ranks before failing
    synthetic_classes: int = 8   # classes of the synthetic dataset
    synthetic_per_class: int = 256  # images per class of the synthetic dataset
    synthetic_family: str = "scheme"  # what a synthetic class is: scheme (shape + texture + colour) |
                                      # shape (the shape alone; colour and texture vary as content)
    resize_to: int | None = None  # shorter side before the random crop (None: image_size * 140/128, FUNIT's)


# The embedded defaults. "cpu": finishes in minutes on 2 cores; "gpu": the paper's configuration.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "trainer": dict(steps=300, sample_every=50, ckpt_every=100, log_every=10),
        "common": dict(image_size=64, batch_size=8),
        # EMA 0.99 and lr 4e-4: a 300-step run's samples must show progress (0.999 would still
        # be ~75% the initial weights at the end).
        "funit2funit": dict(nf=8, nf_mlp=64, latent_dim=16, dis_nf=8, dis_n_res_blks=6,
                            ema_beta=0.99, lr_gen=4e-4, lr_dis=4e-4),
        "cyclefunit": dict(nf=8, nf_mlp=64, latent_dim=16, patch_nf=16, ema_beta=0.99),
        "naive": dict(code_dim=64, gen_channels=64),
    },
    "gpu": {"trainer": {}, "common": {}, "funit2funit": {}, "cyclefunit": {}, "naive": {}},
    # "demo" (`--preset demo`, issues 15 and 23): small images, widths and schedule for a run that shows
    # the class swap within minutes on 2 CPU cores (2400 steps: 7 min 49 s idle, 2026-12-05; 11 min
    # on one thread beside another run), with learning curves (--eval-every). The cpu preset's
    # widths at 32x32 (2400 steps + 12 evaluations: issue 23's 3 seeds measured swap 0.90 -> 0.94 and
    # content error 0.29 -> 0.27 from 1400 steps, docs/evaluation.md), and for FUNIT2FUNIT what the
    # searches measured best (docs/demo_search.md, docs/evaluation.md, 3 seeds): an 8x8 content code
    # (n_downs_content 2, not FUNIT's 3, which leaves 4x4 at 32 px) narrowed to 4 channels, K-shot
    # class codes in training (class_shots 4: the class code no longer carries the class image's
    # background), a short reconstruction weight of 10 and a decoder without instance norm in its
    # upsampling blocks (dec_norm none: content error 0.34 -> 0.29 over 3 seeds). "demo-paper" is the
    # same run with the paper's single-image class codes, issue 15's r_w 3 and FUNIT's decoder (the
    # demo before issue 23; issue 15 measured it at 1400 steps).
    "demo": {
        "trainer": dict(steps=2400, sample_every=200, ckpt_every=200, log_every=20, eval_every=200),
        "common": dict(image_size=32, batch_size=8),
        "funit2funit": dict(nf=8, nf_mlp=64, latent_dim=16, dis_nf=8, dis_n_res_blks=6,
                            ema_beta=0.99, lr_gen=4e-4, lr_dis=4e-4,
                            n_downs_content=2, content_dim=4, class_shots=4, r_w=10.0, dec_norm="none"),
        # CycleFUNIT gets FUNIT2FUNIT's content code, so that `ablate --approaches` compares the
        # approaches' wiring and losses, not two sizes of content code (docs/evaluation.md).
        "cyclefunit": dict(nf=8, nf_mlp=64, latent_dim=16, patch_nf=16, ema_beta=0.99,
                           n_downs_content=2, content_dim=4),
        "naive": dict(code_dim=64, gen_channels=64),
    },
}
# The paper's single-image class codes at the demo's scale: the demo preset of issue 15.
PRESETS["demo-paper"] = {**PRESETS["demo"], "funit2funit": {**PRESETS["demo"]["funit2funit"], "class_shots": 0,
                                                             "r_w": 3.0, "dec_norm": "in"}}

# CLI flag -> (where it goes, key). "cfg" keys belong to the approach config.
FLAG_TARGETS = {
    "data": "trainer", "data_format": "trainer", "steps": "trainer", "out": "trainer",
    "device": "trainer", "precision": "trainer", "backend": "trainer", "sample_every": "trainer",
    "ckpt_every": "trainer", "keep_snapshots": "trainer", "log_every": "trainer", "eval_every": "trainer",
    "nan_policy": "trainer", "nan_check_every": "trainer", "workers": "trainer", "loader": "trainer",
    "subpixel_decoder": "trainer",
    "sync_bn": "trainer", "dist_timeout": "trainer", "synthetic_family": "trainer",
    "image_size": "cfg", "batch_size": "cfg", "seed": "cfg", "init_funit": "cfg",
}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the whole usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def pick_device(name: str):
    """--device auto|cpu|cuda -> torch.device; cuda without a CUDA GPU is a usage error."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    d = TrainOptions()
    p = OneLineErrorParser(
        prog="python -m g2g_fast.train",
        description="Train a G2G cross-training disentanglement model. With no arguments: the "
                    "embedded synthetic dataset, a small preset on CPU or the paper's configuration on a GPU.",
    )
    a = p.add_argument
    a("--approach", choices=sorted(CONFIGS), help="which G2G approach (default: funit2funit)")
    a("--preset", choices=sorted(PRESETS), help="the embedded defaults that flags, --config and --set "
      "override: cpu (small, minutes on a CPU), gpu (the paper's configuration), demo (32x32 with "
      "--eval-every curves, about 8 minutes on 2 idle CPU cores, K-shot class codes; docs/evaluation.md), "
      "demo-paper (the demo with the paper's single-image class codes) (default: "
      "gpu with a CUDA GPU, else cpu; with --resume the checkpoint's settings replace the preset)")
    a("--data", help=f"'synthetic' or a dataset folder (default: {d.data})")
    a("--data-format", choices=["auto", "folder", "celeba"], help=f"dataset layout (default: {d.data_format})")
    a("--image-size", type=int, help="training crop in pixels (default: 128 on GPU, 64 on the CPU preset)")
    a("--batch-size", type=int, help="images per step (per rank under torchrun), even: they form B/2 pairs "
      "(x[j], x[j+B/2]) (default: the approach's: funit2funit 8 = the original's 4 pairs, cyclefunit 4, "
      "naive 32; 8 on the CPU preset)")
    a("--steps", type=int, help="total iterations; with --resume the total, above the checkpoint's step "
      "(default: 100000 on GPU, 300 on the CPU preset; with --resume the checkpoint's)")
    a("--out", help=f"output folder (default: {d.out})")
    a("--device", choices=["auto", "cpu", "cuda"], help=f"device (default: {d.device})")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"],
      help=f"compute precision; fp16 adds loss scaling (default: {d.precision}: bf16 for the fast backend on CUDA, else fp32)")
    a("--backend", choices=["auto", "reference", "fast"],
      help=f"reference (plain PyTorch) or fast (fused kernels, channels_last, fused optimisers) (default: {d.backend}: fast on CUDA)")
    a("--resume", nargs="?", const="", metavar="CKPT",
      help="resume from CKPT (default when given without a path: OUT/checkpoints/last.pt)")
    a("--overwrite", action="store_true",
      help="train into an --out that holds a run, after removing that run's files (config.json, metrics.jsonl, "
           "checkpoints/, samples/, tensorboard/; nothing else); without it (or --resume) such an --out is refused")
    a("--init-funit", metavar="PATH", help="official FUNIT generator file for the initial G (funit2funit/cyclefunit; default: none)")
    a("--config", metavar="FILE", help="YAML or JSON file of config values (default: none)")
    a("--set", action="append", default=[], metavar="KEY=VALUE",
      help="override one config value, repeatable, e.g. --set rl_w=0.1 (default: none)")
    a("--seed", type=int, help="seed for weights, data order and augmentation (default: 0)")
    a("--dry-run", action="store_true", help="print the resolved configuration and exit")
    a("--sample-every", type=int, help="steps between sample grids (default: 1000; CPU preset 50)")
    a("--ckpt-every", type=int, help="steps between checkpoints (default: 1000; CPU preset 100)")
    a("--keep-snapshots", type=int, help=f"periodic step_*.pt checkpoints kept, 0 for none (default: {d.keep_snapshots})")
    a("--log-every", type=int, help="steps between metric lines (default: 50; CPU preset 10)")
    a("--eval-every", type=int, help="steps between evaluations of the EMA generator on held-out images "
      "(reconstruction, swap accuracy, content error, leakage; see python -m g2g_fast.evaluate), written "
      f"to metrics.jsonl as {{\"step\", \"eval\": {{...}}}} lines (default: {d.eval_every} = off)")
    a("--nan-policy", choices=["stop", "skip"], help=f"on a non-finite loss: stop, or skip the update (default: {d.nan_policy})")
    a("--nan-check-every", type=int, help="steps between non-finite loss checks, each a host sync (default: 0 = "
      "every step on the reference backend, every --log-every steps on the fast one)")
    a("--workers", type=int, help="data-loader workers, >= 0 (default: -1 = 0 on CPU, min(8, cores) on CUDA)")
    a("--loader", choices=["auto", "torch", "dali", "gpu-cache"],
      help=f"data loader (default: {d.loader}: on CUDA, DALI for image files when installed, else the GPU "
           "cache when the decoded data fits, else torch; torch on CPU); all give the same batches")
    a("--synthetic-family", choices=["scheme", "shape"],
      help="what a class of --data synthetic is: scheme (a shape with its texture and colour) or shape "
           "(the shape alone, at most 12 classes; colour and texture vary per image as two more content "
           f"factors, scored by the evaluation) (default: {d.synthetic_family}; docs/data.md)")
    a("--subpixel-decoder", action="store_true", default=None,
      help="fast backend: compute the decoder's upsample + 5x5 convs as exact sub-pixel phase convolutions "
           "(2.8x fewer MACs; default: off until a GPU measurement shows it faster)")
    a("--sync-bn", action="store_true", default=None,
      help="under torchrun: BatchNorm statistics over the global batch, as one process would compute them "
           "(the naive approach's encoders; default: per-rank statistics)")
    a("--dist-timeout", type=float, metavar="SECONDS",
      help=f"under torchrun: how long a rank waits for the others (a dead or stuck rank then ends the job "
           f"with an error); must cover rank 0's checkpoints, samples and evaluations (default: {d.dist_timeout:g})")
    return p


def read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise UsageError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from None
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--config {path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of key: value")
    return values


def resolve(args: argparse.Namespace, base: dict | None, cuda_available: bool):
    """-> (approach config, TrainOptions, preset name). `base` = a checkpoint's saved settings."""
    trainer_fields = {f.name for f in dataclasses.fields(TrainOptions)}
    if base is not None:
        preset = "checkpoint"
        approach = base["config"]["approach"]
        if args.approach and args.approach != approach:
            raise UsageError(f"--resume: the checkpoint was trained with --approach {approach}, not {args.approach}")
        cfg_values = {k: v for k, v in base["config"].items() if k != "approach"}
        trainer = dict(base["trainer"])
    else:
        approach = args.approach or "funit2funit"
        device = args.device or "auto"
        on_gpu = device == "cuda" or (device == "auto" and cuda_available)
        preset = args.preset or ("gpu" if on_gpu else "cpu")
        p = PRESETS[preset]
        cfg_values = {**p["common"], **p[approach]}
        trainer = dict(p["trainer"])
    # Config file, flags and --set may hold approach keys and trainer keys alike. Each value is
    # parsed and checked against its field's type and range here, and an error names its source.
    cfg_fields = {f.name for f in dataclasses.fields(CONFIGS[approach])}

    def owner(key):  # the dataclass that has field `key`, or None
        return TrainOptions if key in trainer_fields else CONFIGS[approach] if key in cfg_fields else None

    overrides: dict[str, tuple[Any, str]] = {}  # key -> (value, where it came from)
    if args.config:
        values = read_config_file(args.config)
        file_approach = values.pop("approach", None)
        if file_approach and file_approach != approach:
            raise UsageError(f"--config {args.config}: approach {file_approach!r} conflicts with {approach!r}")
        overrides.update({k: (v, f"--config {args.config}") for k, v in values.items()})
    for flag in FLAG_TARGETS:
        value = getattr(args, flag)
        if value is not None:
            overrides[flag] = (value, "--" + flag.replace("_", "-"))
    for item in args.set:
        if "=" not in item:
            raise UsageError(f"--set {item}: expected KEY=VALUE")
        key, text = (part.strip() for part in item.split("=", 1))
        overrides[key] = (text, f"--set {item}")
    for key, (value, source) in overrides.items():
        if owner(key) is None:
            raise UsageError(f"{source}: unknown key {key!r}; {approach} config keys: {', '.join(sorted(cfg_fields))}; "
                             f"trainer options: {', '.join(sorted(trainer_fields))}")
        try:
            if source.startswith("--set "):  # text, parsed as the field's type
                value = parse_field(owner(key), key, value)
            value = check_value(owner(key), key, value)
        except ValueError as e:
            raise UsageError(f"{source}: {e}") from None
        (trainer if key in trainer_fields else cfg_values)[key] = value
    try:
        cfg = config_from_dict(approach, cfg_values)
    except ValueError as e:
        raise UsageError(str(e)) from None
    opts = TrainOptions(**trainer)
    check_options(opts)
    if base is not None:
        check_resume_steps(int(base.get("step", 0)), opts.steps, given="steps" in overrides)
    return cfg, opts, preset


def check_resume_steps(done: int, steps: int, given: bool) -> None:
    """--resume of a run at step `done` to `steps` in total. At or past it nothing would train: an
    error (exit 2), not a 'done' line that reads as if the steps had run; `given`: whether --steps
    came from the user (else it is the checkpoint's own)."""
    if steps > done:
        return
    what = f"--steps {steps}" if given else f"its --steps {steps} (from the checkpoint)"
    where = f"past {what}" if steps < done else f"which is {what}: nothing to train"
    raise UsageError(f"--resume: the run is already at step {done}, {where}; pass --steps above {done} "
                     f"to train further")


def check_options(o: TrainOptions) -> None:
    try:
        check_fields(o)  # types (and normalisation) first; the ranges of trainer options follow
    except ValueError as e:
        raise UsageError(str(e)) from None
    choices = {"data_format": ("auto", "folder", "celeba"), "device": ("auto", "cpu", "cuda"),
               "precision": ("auto", "fp32", "bf16", "fp16"), "backend": ("auto", "reference", "fast"),
               "nan_policy": ("stop", "skip"), "loader": ("auto", "torch", "dali", "gpu-cache"),
               "synthetic_family": ("scheme", "shape")}
    for name, allowed in choices.items():
        if getattr(o, name) not in allowed:
            raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {getattr(o, name)!r}")
    if o.nan_check_every < 0:
        raise UsageError(f"--nan-check-every must be >= 0, got {o.nan_check_every!r}")
    if o.eval_every < 0:
        raise UsageError(f"--eval-every must be >= 0 (0 = off), got {o.eval_every!r}")
    if not o.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {o.dist_timeout!r}")
    for name in ("steps", "sample_every", "ckpt_every", "log_every"):
        if getattr(o, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(o, name)!r}")
    if o.keep_snapshots < 0:
        raise UsageError(f"--keep-snapshots must be >= 0 (0 = no step_*.pt copies), got {o.keep_snapshots!r}")
    if o.workers < -1:
        raise UsageError(f"--workers must be >= 0, or -1 for the default (0 on CPU, min(8, cores) on CUDA), "
                         f"got {o.workers!r}")
    # keys without a flag; a bad synthetic_classes gets the dataset's own line (it needs 2 or more)
    for name in ("synthetic_per_class", "resize_to"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            raise UsageError(f"--set {name}: {name} must be a positive integer, got {getattr(o, name)!r}")
