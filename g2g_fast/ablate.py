"""`python -m g2g_fast.ablate`: the ablation the paper proposes for FUNIT2FUNIT (its Sec. VI), with
seeds; the same runner compares the three approaches or sweeps one setting.

    python -m g2g_fast.ablate --steps 150 --out runs/ablation
    python -m g2g_fast.ablate --seeds 3 --out runs/ablation -- --preset demo
    python -m g2g_fast.ablate --approaches --seeds 3 --out runs/approaches -- --preset demo
    python -m g2g_fast.ablate --sweep content_dim=0,16,4 --seeds 3 --out runs/content_code -- --preset demo

The three losses G2G adds to FUNIT's are switched off (weight 0) in turn, plus all on and all off:

  all_on          every loss at its configured weight
  no_long_rec     rl_w = 0            L1 of the two-stage reconstructions r_i vs x_i
  no_long_fm      fml_w = 0           feature matching r_i vs x_i
  no_mix_rec_fm   fml_mix_rec_w = 0   feature matching r_i vs the mix that carries its class
  all_off         all three 0

`--approaches` runs funit2funit, cyclefunit and naive instead; `--sweep KEY=V1,V2,...` one variant
per value of a setting (`--set KEY=V`, FUNIT2FUNIT unless `--approach`). Every variant trains with
the same data, seed(s) and steps (the trainer, into OUT/<variant>/, or OUT/<variant>/seed_<s>/ with
`--seeds N`, the seeds --seed, --seed + 1, ...); then the EMA generator of each last checkpoint is
evaluated by `g2g_fast.evaluate` on the same held-out pairs with the same probes (data seed
--data-seed, default 0, whatever seed a run trained with, as `python -m g2g_fast.evaluate`). Prints a
markdown table (with seeds: mean ± sample standard deviation per metric) and the comparison with the
first variant (all_on) against the seed-to-seed spread and by Welch's t-test (p-values with scipy,
`pip install -e ".[stats]"`), and writes OUT/ablation.md, OUT/ablation.json,
OUT/curves.png (the --eval-every curves, one per variant: mean over seeds, min-max band; needs
matplotlib), OUT/samples/<variant>.png (each variant's final sample grid, first seed) and
OUT/samples.png (all variants, first pairs). A run whose last checkpoint already has the steps is
evaluated, not retrained; one with fewer steps is resumed (exactly). Trainer flags after `--` go
to every variant.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from . import ablate_figures as F
from . import ablate_report as R
from . import cpu_threads, run_folder
from . import evaluate as E
from . import fidelity as FID
from . import metrics as M
from . import probes as P
from .ablate_variants import ABLATED, APPROACHES, VARIANTS, Variant, build_variants, mode_of  # noqa: F401 (re-exported)
from .checkpoint import CheckpointError, load_checkpoint
from .config import config_to_dict
from .data import DataError
from .options import OneLineErrorParser, UsageError
from .options import build_parser as train_parser
from .options import resolve

# Set by ablate itself (the same for every variant); not accepted after `--`.
RESERVED = ("--approach", "--out", "--steps", "--seed", "--data", "--device", "--resume", "--overwrite",
            "--dry-run")
# Trainer settings that define the data; a checkpoint trained with others is not this ablation's.
DATA_KEYS = ("data", "data_format", "synthetic_classes", "synthetic_per_class", "synthetic_family", "resize_to")
LOSS_KEYS = ("g_total", "g_adv", "g_long", "g_fm_long", "g_fm_mix_rec", "d_total")


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="python -m g2g_fast.ablate", description=__doc__.split("\n\n")[0],
                           epilog="Trainer flags after `--` (e.g. -- --image-size 32 --set nf=8) apply to every variant.")
    p.add_argument("--steps", type=int, help="training steps of every variant (default: the preset's, 300 on CPU)")
    p.add_argument("--out", default="runs/ablation", help="output folder (default: runs/ablation)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder (default: synthetic)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every variant's training (with --seeds: the first; default: 0)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="train every variant with N seeds (--seed, --seed + 1, ...) into OUT/<variant>/seed_<s>/ and "
                        "report mean and spread over them (default: one seed, into OUT/<variant>/)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--approaches", action="store_true",
                      help=f"compare the approaches ({', '.join(APPROACHES)}) instead of the loss ablation")
    mode.add_argument("--sweep", metavar="KEY=V1,V2,...", action="append",
                      help="one variant per value of a setting (--set KEY=V), e.g. content_dim=0,16,4; the "
                           "first value is the baseline of the comparison. Repeatable: each adds its variants; "
                           "KEY=V+KEY2=W is one variant with both settings (e.g. --sweep class_shots=0,4 --sweep "
                           "class_shots=4+class_encoder=coco)")
    p.add_argument("--approach", choices=APPROACHES,
                   help="approach of a --sweep (default: funit2funit; the loss ablation is FUNIT2FUNIT's)")
    p.add_argument("--variants", help=f"comma-separated subset of the variants (loss ablation: {', '.join(VARIANTS)}; "
                                      f"default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device (default: auto)")
    p.add_argument("--samples", type=int, default=256, help="held-out pairs evaluated per variant (default: 256)")
    p.add_argument("--data-seed", type=int, default=E.EVAL_DATA_SEED,
                   help=f"seed of the held-out data and the probes' training images, the same for every run whatever "
                        f"its seed (default: {E.EVAL_DATA_SEED}, as python -m g2g_fast.evaluate)")
    p.add_argument("--eval-seed", type=int, default=E.EVAL_SEED,
                   help=f"seed of the held-out pairs and the probes (default: {E.EVAL_SEED}, as evaluate's --seed)")
    p.add_argument("--probe-train", type=int, default=2048, help="training images for the probes (default: 2048)")
    p.add_argument("--probe-steps", type=int, default=P.PROBE_STEPS,
                   help=f"training steps of each image probe (default: {P.PROBE_STEPS})")
    p.add_argument("--probe-cache", metavar="DIR", help=f"probe cache folder (default: {P.default_cache_dir()})")
    p.add_argument("--no-probe-cache", action="store_true", help="always retrain the probes")
    FID.add_arguments(p)  # FID/KID of every run's mixes, as evaluate's (issue 24 #11)
    return p


def seeds_of(args) -> list[int]:
    return [args.seed + i for i in range(args.seeds or 1)]


def run_dir(args, variant: str, seed: int) -> Path:
    """OUT/<variant> (one seed, as before --seeds existed), OUT/<variant>/seed_<s> with --seeds."""
    return Path(args.out) / variant if args.seeds is None else Path(args.out) / variant / f"seed_{seed}"


def variant_argv(args, variant: Variant, seed: int, passthrough: list[str]) -> list[str]:
    argv = ["--approach", variant.approach, "--out", str(run_dir(args, variant.name, seed)), "--seed", str(seed),
            "--data", args.data, "--device", args.device]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    argv += passthrough  # after ablate's flags; the variant's --set goes last and wins
    for item in variant.sets:
        argv += ["--set", item]
    return argv


def check_passthrough(passthrough: list[str]) -> None:
    for arg in passthrough:
        flag = arg.split("=", 1)[0]
        if flag == "--overwrite":
            raise UsageError("--overwrite after `--`: ablate resumes a variant that has a checkpoint and replaces "
                             "one that has none; to start over, use another --out or delete it")
        if flag in RESERVED:
            raise UsageError(f"{flag} after `--`: ablate sets it for every variant; give it before `--` "
                             f"(ablate has --out, --steps, --seed, --seeds, --data, --device, --approach) or drop it")


def parse_train_args(argv: list[str]):
    """The trainer's parser, with its errors as UsageError (they come from the flags after `--`)."""
    p = train_parser()

    def error(message):
        raise UsageError(f"trainer flags after `--`: {message} (see python -m g2g_fast.train --help)")
    p.error = error
    return p.parse_args(argv)


def checkpoint_state(path: Path, cfg, opts, variant: str) -> int:
    """-> the step of `path` (0 when absent). A checkpoint of other settings is an error: mixing
    runs would silently break 'same data, seeds and steps'."""
    if not path.is_file():
        return 0
    ckpt = load_checkpoint(path)
    trainer = ckpt.get("trainer") or {}
    # A key the checkpoint lacks was saved before that setting existed: the run had its default.
    config, defaults = ckpt.get("config") or {}, config_to_dict(type(cfg)())
    data_defaults = vars(type(opts)())
    if (set(config) - set(defaults) or any(config.get(k, defaults[k]) != v for k, v in config_to_dict(cfg).items())
            or any(trainer.get(k, data_defaults[k]) != getattr(opts, k) for k in DATA_KEYS)):
        raise UsageError(f"{path}: variant {variant} was trained with other settings; use another --out "
                         f"or delete {path.parent.parent}")
    if int(ckpt["step"]) > opts.steps:
        raise UsageError(f"{path}: variant {variant} is at step {ckpt['step']}, beyond --steps {opts.steps}; "
                         f"pass --steps {ckpt['step']} or use another --out")
    return int(ckpt["step"])


def final_losses(metrics_file: Path) -> dict:
    """Mean of each LOSS_KEYS term over the last tenth of the run's loss lines (at least one)."""
    if not metrics_file.is_file():
        return {}
    lines = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()]
    lines = [r for r in lines if "g_total" in r]
    tail = lines[-max(1, len(lines) // 10):]
    return {k: sum(r[k] for r in tail) / len(tail) for k in LOSS_KEYS if tail and all(k in r for r in tail)}


# ---- the three phases: plan (checks everything), train, evaluate --------------------------------

def plan_variants(args, variants: dict[str, Variant], passthrough: list[str]) -> dict:
    """-> {(variant, seed): its trainer argv, resolved settings and checkpoint state}; every run is
    resolved, and so checked, before anything trains."""
    check_passthrough(passthrough)
    plans = {}
    for v in variants.values():
        for seed in seeds_of(args):
            name = v.name if args.seeds is None else f"{v.name}/seed_{seed}"
            vargv = variant_argv(args, v, seed, passthrough)
            try:
                cfg, opts, _ = resolve(parse_train_args(vargv), None, torch.cuda.is_available())
            except UsageError as e:
                raise UsageError(f"variant {v.name}: {e}" if mode_of(args) != "losses" else str(e)) from None
            ckpt = Path(opts.out) / "checkpoints" / "last.pt"
            plans[v.name, seed] = SimpleNamespace(variant=v, seed=seed, name=name, argv=vargv, cfg=cfg, opts=opts,
                                                  ckpt=ckpt, done=checkpoint_state(ckpt, cfg, opts, name))
    return plans


def train_variants(plans: dict, log) -> dict | int:
    """Train (or resume) what is not done -> {(variant, seed): (status, train seconds)}, or the
    trainer's exit code when the whole ablation must stop."""
    from .train import main as train_main
    status = {}
    for i, (key, plan) in enumerate(plans.items()):
        run_file = Path(plan.opts.out) / "ablation_run.json"
        prev = json.loads(run_file.read_text()) if run_file.is_file() and plan.done else {}  # none: from scratch
        where = f"variant {plan.name} ({i + 1}/{len(plans)})"
        if plan.done == plan.opts.steps:
            log(f"{where}: done at step {plan.done}, evaluating only")
            status[key] = ("ok", prev.get("train_s"))
            continue
        log(f"{where}: training {plan.opts.steps} steps" + (f", resuming at step {plan.done}" if plan.done else "")
            + (f" with {', '.join(plan.variant.sets)}" if plan.variant.sets else ""))
        t0 = time.time()
        # No checkpoint yet: what an earlier attempt left there (config, metrics) is replaced.
        code = train_main(plan.argv + (["--resume"] if plan.done else ["--overwrite"]))
        if code in (2, 130):  # bad input (the same for every variant) or Ctrl-C: stop here
            return code
        train_s = time.time() - t0 + (prev.get("train_s") or 0.0)
        run_file.write_text(json.dumps({"argv": plan.argv, "train_s": train_s}, indent=2))
        status[key] = ("ok" if code == 0 else f"failed (exit {code})", train_s)  # e.g. a non-finite loss
    return status


def evaluate_variants(args, plans: dict, status: dict, out: Path, log, fid=None) -> dict:
    """Evaluate every trained run on the same held-out pairs with the same probes (of --data-seed's
    data and --eval-seed, whatever seed a run trained with: evaluate's defaults, so `python -m
    g2g_fast.evaluate --checkpoint` gives a row's numbers); copy the sample grids -> the report
    (see ablation.json)."""
    from .translate import load_generator
    first = next(iter(plans.values()))
    opts = first.opts
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    prepared = {}  # image size -> (train set, held-out set, classes, probes, where): one per size

    def data_for(size):
        if size not in prepared:
            train_set, held, num_classes, identity, where = E.prepare_data(
                opts.data, data_format=opts.data_format, image_size=size, seed=args.data_seed,
                synthetic_classes=opts.synthetic_classes, synthetic_per_class=opts.synthetic_per_class,
                synthetic_family=opts.synthetic_family, resize_to=opts.resize_to, samples=args.samples,
                probe_train=args.probe_train)
            cache = None if args.no_probe_cache else (args.probe_cache or P.default_cache_dir())
            probes = M.build_probes(train_set, identity, cache, seed=args.eval_seed, log=log, steps=args.probe_steps)
            prepared[size] = (train_set, held, num_classes, probes, where)
        return prepared[size]

    data_for(first.cfg.image_size)
    steps = {plan.opts.steps for plan in plans.values()}  # one number, unless a sweep of steps
    # seed: the (first) training seed; data_seed, eval_seed: the evaluation's, the same for every run
    report = {"mode": mode_of(args), "steps": steps.pop() if len(steps) == 1 else None, "seed": args.seed,
              "data_seed": args.data_seed, "eval_seed": args.eval_seed, "data": opts.data,
              "synthetic_family": opts.synthetic_family if opts.data == "synthetic" else None,
              "image_size": first.cfg.image_size, "heldout": prepared[first.cfg.image_size][4],
              "samples": args.samples,
              "device": device.type + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                       else f" ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"),
              "variants": {}}
    if args.seeds is not None:
        report["seeds"] = seeds_of(args)
    grids = {}
    for (v, seed), plan in plans.items():
        st, train_s = status[v, seed]
        run = {"seed": seed, "data_seed": args.data_seed, "eval_seed": args.eval_seed, "dir": str(plan.opts.out),
               "status": st, "train_s": train_s, "metrics": None,
               "final_losses": final_losses(Path(plan.opts.out) / "metrics.jsonl")}
        if st == "ok":
            train_set, held, num_classes, probes, _ = data_for(plan.cfg.image_size)
            gen, _ = load_generator(SimpleNamespace(funit=None, checkpoint=str(plan.ckpt), raw=False, image_size=None))
            run["metrics"] = M.evaluate_model(gen.to(device), train_set, held, probes, num_classes,
                                              samples=args.samples, seed=args.eval_seed, device=device)
            if fid is not None:  # a fidelity.Extractor (--fid-weights)
                fid_metrics, report["fidelity"] = FID.per_class(  # the same notes for every run: warn once
                    gen, held, fid, samples=args.fid_samples, seed=args.eval_seed, device=device,
                    log=None if "fidelity" in report else log)
                run["metrics"].update(fid_metrics)
            (Path(plan.opts.out) / "eval.json").write_text(json.dumps(run["metrics"], indent=2))
            grid = Path(plan.opts.out) / "samples" / f"step_{plan.opts.steps:07d}.png"
            if grid.is_file() and v not in grids:  # the first seed's grid
                grids[v] = out / "samples" / f"{v}.png"
                grids[v].parent.mkdir(exist_ok=True)
                shutil.copyfile(grid, grids[v])
            report.setdefault("reference", {k: run["metrics"][k] for k in
                                            ("swap_chance", "probe_class_acc", "probe_content_error")})
        entry = report["variants"].setdefault(v, {
            "approach": plan.variant.approach, "set": plan.variant.sets, "off": plan.variant.off,
            "steps": plan.opts.steps,
            **({"weights": {k: getattr(plan.cfg, k) for k in ABLATED}} if hasattr(plan.cfg, "rl_w") else {}),
            "runs": {}})
        entry["runs"][str(seed)] = run
    for entry in report["variants"].values():
        runs = list(entry["runs"].values())
        failed = [r["status"] for r in runs if r["status"] != "ok"]
        entry["status"] = "ok" if not failed else failed[0] if len(runs) == 1 else \
            f"{len(failed)}/{len(runs)} runs failed"
        entry["metrics"], entry["stats"], entry["final_losses"] = R.variant_stats(entry["runs"])
        times = [r["train_s"] for r in runs if r["train_s"] is not None]
        entry["train_s"] = sum(times) / len(times) if times else None  # per run
    if grids:
        size = first.cfg.image_size
        F.combined_grid({v: p for v, p in grids.items() if plans[v, seeds_of(args)[0]].cfg.image_size == size},
                      size, out / "samples.png")
    return report


def main(argv=None) -> int:
    with contextlib.ExitStack() as hold:  # the lock on --out, taken by _main, held to the end
        return _main(argv, hold)


def _main(argv, hold: contextlib.ExitStack) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, passthrough = build_parser().parse_args(argv[:cut]), argv[cut + 1:]
    log = lambda msg: print(f"[g2g] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.time()
    threads = cpu_threads.setup(log)  # once for every variant's training and evaluation in this process
    try:
        for name in ("samples", "probe_train", "probe_steps"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
        if args.seeds is not None and args.seeds < 1:
            raise UsageError(f"--seeds must be a positive integer, got {args.seeds}")
        fid = FID.from_args(args)  # before anything trains: a missing weight file is one line
        variants = build_variants(args)
        # Before reading the variants' checkpoints: a second ablate into --out is refused (naming
        # the PID of the first); each variant's folder is locked by its training, as any run's.
        hold.enter_context(run_folder.lock(Path(args.out)))
        plans = plan_variants(args, variants, passthrough)
    except (UsageError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(threads)
    if importlib.util.find_spec("matplotlib") is None:
        log('note: matplotlib is not installed, so there will be no curves.png (pip install -e ".[plot]")')
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = [plan.name for plan in plans.values() if plan.done < plan.opts.steps]
    status = train_variants(plans, log)
    if isinstance(status, int):
        return status
    try:
        report = evaluate_variants(args, plans, status, out, log, fid)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["figure"] = F.write_curves(mode_of(args), plans, out, log)
    report["comparison"] = R.comparison(report, report["mode"])
    report["answer"] = R.answer(report, report["mode"], ABLATED, {v: e["off"] for v, e in report["variants"].items()})
    report["targets"] = R.targets(report)
    # wall_s: this invocation (training of `trained_now` and every evaluation)
    report = {"command": "python -m g2g_fast.ablate " + " ".join(argv), **report, "trained_now": trained,
              "wall_s": time.time() - t_start}
    table = R.format_report(report)
    print(table)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    log(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}"
        + (f", {out / 'curves.png'}" if report["figure"] else "") + f" and the samples; {report['wall_s']:.0f}s in all")
    return 0 if all(st == "ok" for st, _ in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
