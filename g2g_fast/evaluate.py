"""`python -m g2g_fast.evaluate`: disentanglement metrics of a G2G generator (issue 7).

    python -m g2g_fast.evaluate --checkpoint runs/g2g/checkpoints/last.pt --json metrics.json
    python -m g2g_fast.evaluate --funit animal149_gen.pt --data datasets/animals --image-size 128

Metrics: `g2g_fast/metrics.py` (each one defined there) and docs/evaluation.md. The held-out images:
`prepare_data` below, of data seed EVAL_DATA_SEED whatever seed the checkpoint trained with.
--k-shot K (default 1): each original's class code in stage 1 is the mean of the class codes of K
held-out images of its class (itself and K-1 others, seeded), as FUNIT's few-shot test; the mixes,
short reconstructions and (through the mixes) the two-stage ones use it. Leakage is per image.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from . import cpu_threads, memory_estimate
from . import fidelity as FID
from . import probes as P
from .checkpoint import CheckpointError, load_checkpoint
from .data import DataError, build_dataset
from .options import OneLineErrorParser, pick_device
from .run_folder import check_out_file
from .metrics import build_probes, check_k_shot, evaluate_model, format_table, load_set, pair_indices, spread_indices

# ---- data / model setup for the CLI -------------------------------------------------------------

# The held-out data of every evaluation of a trained run, this CLI's and ablate's: data seed 0,
# whatever seed the run trained with. On synthetic data the seed draws only the poses (a class looks
# the same under every seed), so any seed's test split is held out from any run; on folder data it
# picks the images kept from the probes. One fixed seed gives every run, and every row of an
# ablation over seeds, the same images, pairs and probes, so the rows differ by their models only
# (before issue 23 this CLI used the checkpoint's seed and ablate its base seed: they disagreed).
EVAL_DATA_SEED = 0
EVAL_SEED = 0  # pairs and probes (--seed, alias --eval-seed as in ablate)


def prepare_data(data: str, *, data_format="auto", image_size=64, seed=0, synthetic_classes=8,
                 synthetic_per_class=256, synthetic_family="scheme", resize_to=None, samples=256, probe_train=2048,
                 heldout_split="test"):
    """-> (train ImageSet for the probes, held-out ImageSet, num_classes, identity dict, where).

    Synthetic data: held-out = the `heldout_split` split (same classes, new poses; "test" for the
    CLI, "val" during training). Folder/CelebA data: their test splits usually hold other classes,
    so a seeded fifth of the training split (at most max(2 * samples, 64) images) is held out from
    the probes instead."""
    kw = dict(data_format=data_format, image_size=image_size, resize_to=resize_to, seed=seed,
              synthetic_classes=synthetic_classes, synthetic_per_class=synthetic_per_class,
              synthetic_family=synthetic_family)
    ds = build_dataset(data, split="train", **kw)
    n_hold = max(2 * samples, 64)
    if data == "synthetic":
        test = build_dataset(data, split=heldout_split, **kw)
        train = load_set(ds, spread_indices(ds.labels, probe_train, seed))
        held = load_set(test, spread_indices(test.labels, n_hold, seed + 3))
        where = f"synthetic {heldout_split} split"
        # the family decides what the factor probe regresses (shape: + hue, texture): part of the key
        identity = {"data": "synthetic", "classes": synthetic_classes, "per_class": synthetic_per_class,
                    "family": synthetic_family}
    else:
        order = spread_indices(ds.labels, len(ds), seed)
        n_hold = min(n_hold, len(order) // 5)
        held, train = load_set(ds, order[:n_hold]), load_set(ds, order[n_hold:n_hold + probe_train])
        where = f"{n_hold} images held out of the training split"
        # n_hold decides which images the probes train on, so it is part of the cache key
        identity = {"data": os.path.abspath(data), "format": data_format, "n_images": len(ds),
                    "classes": list(ds.class_names), "resize_to": resize_to, "n_heldout": n_hold}
    identity.update(image_size=image_size, data_seed=seed, probe_train=probe_train)
    return train, held, ds.num_classes, identity, where


# Below this many distinct held-out images behind the pairs, the CLI warns. One image's scores are
# alike in every pair it is in, so an evaluation has about as many independent samples as images: at
# 32, an accuracy near 0.5 has a standard error of sqrt(0.25 / 32) = 0.09, already the size of the
# differences between ablation variants (docs/evaluation.md); with fewer, a score says more about
# which images were held out than about the model.
MIN_DISTINCT_IMAGES = 32


def distinct_pair_images(held_y: torch.Tensor, samples: int, seed: int, synthetic: bool) -> tuple[int, str | None]:
    """-> (how many distinct held-out images the `samples` pairs of `seed` come from, a warning
    when that is below MIN_DISTINCT_IMAGES, else None)."""
    i1, i2 = pair_indices(held_y, samples, seed)  # the pairs evaluate_model draws
    distinct = len(set(i1.tolist()) | set(i2.tolist()))
    if distinct >= MIN_DISTINCT_IMAGES:
        return distinct, None
    if len(held_y) >= MIN_DISTINCT_IMAGES:
        fix = f"pass --samples {MIN_DISTINCT_IMAGES} or more"
    elif synthetic:
        fix = f"the held-out split has {len(held_y)} images; pass a larger --synthetic-per-class"
    else:  # prepare_data holds out a fifth of a folder's images
        fix = (f"the held-out set has {len(held_y)} images, a fifth of the dataset's; a dataset of "
               f"{5 * MIN_DISTINCT_IMAGES} images or more gives {MIN_DISTINCT_IMAGES}")
    return distinct, (f"warning: the {samples} pairs come from only {distinct} distinct held-out images "
                      f"(fewer than {MIN_DISTINCT_IMAGES}): the metrics say more about these images than "
                      f"about the model; {fix}")


# ---- during training (`python -m g2g_fast.train --eval-every N`) -----------------------------------

CLI_SAMPLES = 256          # the CLI's --samples default; it sizes the held-out set (folder data: and
                           # with it which images the probes train on, part of the probe cache key)
TRAIN_EVAL_SAMPLES = 128   # held-out pairs per evaluation during training, from that same held-out set
TRAIN_EVAL_LEAK = 1024     # training images for the leakage probes
TRAIN_EVAL_SEED = 0        # pairs and probes: the CLI's default seed, so its cached probes are shared


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


class TrainingEvaluator:
    """The metrics of the generator being trained, on a fixed held-out set (`--eval-every`).

    Built once before the loop: the held-out images (synthetic: the "val" split, kept apart from
    the "test" split the CLI reports on; folders: a seeded subset of the training split, as the
    CLI) and the probes, trained once with the CLI's recipe and cache key (`evaluate` reuses them).
    Each call evaluates the EMA generator (the raw one without EMA) in eval mode, then restores its
    mode. Both run under forked RNG states, so the run's random streams, and with them its losses,
    are the same with and without --eval-every."""

    def __init__(self, approach, opts, cache_dir=None, log=None, probe_steps: int | None = None):
        cfg = approach.cfg
        with torch.random.fork_rng(devices=_rng_devices(approach.device)):
            self.train_set, self.held, self.num_classes, identity, self.where = prepare_data(
                opts.data, data_format=opts.data_format, image_size=cfg.image_size, seed=cfg.seed,
                synthetic_classes=opts.synthetic_classes, synthetic_per_class=opts.synthetic_per_class,
                synthetic_family=opts.synthetic_family, resize_to=opts.resize_to, samples=CLI_SAMPLES,
                heldout_split="val")
            cache = P.default_cache_dir() if cache_dir is None else cache_dir
            self.probes = build_probes(self.train_set, identity, cache, seed=TRAIN_EVAL_SEED, log=log,
                                       steps=probe_steps or P.PROBE_STEPS)

    def __call__(self, approach) -> dict:
        """-> the metrics (METRIC_KEYS) of `approach`'s EMA generator now."""
        gen = approach.gen_ema if approach.gen_ema is not None else approach.gen
        was_training = gen.training
        gen.eval()
        try:
            with torch.random.fork_rng(devices=_rng_devices(approach.device)):
                return evaluate_model(gen, self.train_set, self.held, self.probes, self.num_classes,
                                      samples=TRAIN_EVAL_SAMPLES, seed=TRAIN_EVAL_SEED, device=approach.device,
                                      leak_train=TRAIN_EVAL_LEAK)
        finally:
            gen.train(was_training)

    def record(self, approach) -> dict:
        """-> the metrics.jsonl line: {"step", "eval": {metrics}, "sec_eval"}."""
        t0 = time.perf_counter()
        metrics = self(approach)
        return {"step": approach.step, "eval": metrics, "sec_eval": time.perf_counter() - t0}


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="python -m g2g_fast.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="a g2g-fast training checkpoint")
    src.add_argument("--funit", metavar="PATH", help="an official FUNIT generator file (uses gen_test)")
    p.add_argument("--data", help="'synthetic' or a dataset folder (default: the checkpoint's, else synthetic)")
    p.add_argument("--data-format", choices=["auto", "folder", "celeba"], default=None)
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's, 128 for --funit")
    p.add_argument("--synthetic-classes", type=int, default=None)
    p.add_argument("--synthetic-per-class", type=int, default=None)
    p.add_argument("--synthetic-family", choices=["scheme", "shape"], default=None,
                   help="what a synthetic class is (default: the checkpoint's, else scheme; docs/data.md)")
    p.add_argument("--data-seed", type=int, default=EVAL_DATA_SEED,
                   help=f"seed of the held-out data and of the probes' training images (default: {EVAL_DATA_SEED} "
                        f"whatever seed the checkpoint trained with, as in ablate)")
    p.add_argument("--seed", "--eval-seed", dest="seed", type=int, default=EVAL_SEED,
                   help=f"seed of the pairs and the probes (default: {EVAL_SEED}; ablate's --eval-seed)")
    p.add_argument("--samples", type=int, default=CLI_SAMPLES,
                   help=f"held-out pairs to evaluate (default: {CLI_SAMPLES})")
    p.add_argument("--probe-train", type=int, default=2048, help="training images for the probes (default: 2048)")
    p.add_argument("--probe-steps", type=int, default=P.PROBE_STEPS,
                   help=f"training steps of each image probe (default: {P.PROBE_STEPS}; part of the cache key)")
    p.add_argument("--probe-cache", metavar="DIR", default=None,
                   help=f"probe cache folder (default: {P.default_cache_dir()})")
    p.add_argument("--no-probe-cache", action="store_true", help="always retrain the probes")
    p.add_argument("--json", metavar="OUT", help="also write the metrics as JSON")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--k-shot", type=int, default=1, metavar="K",
                   help="class codes averaged over K held-out images of the class (default: 1)")
    p.add_argument("--raw", action="store_true", help="use the raw generator instead of the EMA one")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    FID.add_arguments(p)  # --fid-weights, --fid-samples (issue 24 #11)
    return p


def _check_args(a):
    for name in ("samples", "probe_train", "probe_steps", "batch_size", "k_shot", "image_size",
                 "synthetic_per_class"):  # the last two: None when not given
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    if a.json:  # before the evaluation, not after it
        check_out_file(Path(a.json), "--json", "metrics.json")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(f"[g2g] {msg}", file=sys.stderr)  # noqa: E731
    threads = cpu_threads.setup(log)
    try:
        _check_args(args)
        from .translate import load_generator
        device = pick_device(args.device)
        trainer, train_seed = {}, None
        if args.checkpoint:
            ckpt = load_checkpoint(args.checkpoint)
            trainer, train_seed = dict(ckpt.get("trainer") or {}), ckpt["config"].get("seed")
            del ckpt
        gen, size = load_generator(args)
        memory_estimate.check_evaluate(args, memory_estimate.generator_config(args.checkpoint), size, device)
        gen.to(device)
        pick = lambda v, key, default: v if v is not None else trainer.get(key, default)  # noqa: E731
        data = pick(args.data, "data", "synthetic")
        train, held, num_classes, identity, where = prepare_data(
            data, data_format=pick(args.data_format, "data_format", "auto"), image_size=size,
            seed=args.data_seed,
            synthetic_classes=pick(args.synthetic_classes, "synthetic_classes", 8),
            synthetic_per_class=pick(args.synthetic_per_class, "synthetic_per_class", 256),
            synthetic_family=pick(args.synthetic_family, "synthetic_family", "scheme"),
            resize_to=trainer.get("resize_to"), samples=args.samples, probe_train=args.probe_train)
        check_k_shot(held.y, held.y, args.k_shot)  # before the probes train: a one-line error, not a traceback
        fid = FID.from_args(args, held.y, args.k_shot)  # None unless --fid-weights
        distinct, warning = distinct_pair_images(held.y, args.samples, args.seed, synthetic=data == "synthetic")
    except (CheckpointError, DataError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(threads)
    if warning:  # before the probes train, so it is seen early; a warning, not an error: it still runs
        log(warning)
    cache = None if args.no_probe_cache else (args.probe_cache or P.default_cache_dir())
    t0 = time.time()
    probes = build_probes(train, identity, cache, seed=args.seed, log=log, steps=args.probe_steps)
    metrics = evaluate_model(gen, train, held, probes, num_classes, samples=args.samples, seed=args.seed,
                             batch=args.batch_size, device=device, k_shot=args.k_shot)
    fid_info = None
    if fid is not None:
        fid_metrics, fid_info = FID.per_class(gen, held, fid, samples=args.fid_samples, k_shot=args.k_shot,
                                              seed=args.seed, batch=args.batch_size, device=device, log=log)
        metrics.update(fid_metrics)
    log(f"evaluated {args.samples} pairs from {distinct} distinct held-out images"
        f"{f' ({args.k_shot}-shot)' if args.k_shot > 1 else ''} in "
        f"{time.time() - t0:.1f}s")
    print(format_table(metrics))
    print(f"held-out: {where}, data seed {args.data_seed}"
          + (f" (the checkpoint trained with seed {train_seed})" if train_seed is not None else "")
          + f"; pairs and probes seed {args.seed}")
    if args.json:
        # seed: of the pairs and probes; data_seed: of the held-out data; train_seed: the checkpoint's
        report = {"source": args.checkpoint or args.funit, "data": data, "heldout": where,
                  "image_size": size, "num_classes": num_classes, "samples": args.samples, "seed": args.seed,
                  "data_seed": args.data_seed, "train_seed": train_seed,
                  "distinct_images": distinct, "k_shot": args.k_shot,
                  "generator": "raw" if args.raw else "ema", "metrics": metrics}
        if fid_info is not None:
            report["fidelity"] = fid_info
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # atomic: a killed write leaves no torn JSON
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, path)
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
