"""`python -m g2g_fast.ablate`: the ablation the paper proposes for FUNIT2FUNIT (its Sec. VI).

    python -m g2g_fast.ablate --steps 150 --out runs/ablation
    python -m g2g_fast.ablate --variants all_on,all_off --steps 2000 -- --set rl_w=0.1 --eval-every 500

The three losses G2G adds to FUNIT's are switched off (weight 0) in turn, plus all on and all off:

  all_on          every loss at its configured weight
  no_long_rec     rl_w = 0            L1 of the two-stage reconstructions r_i vs x_i
  no_long_fm      fml_w = 0           feature matching r_i vs x_i
  no_mix_rec_fm   fml_mix_rec_w = 0   feature matching r_i vs the mix that carries its class
  all_off         all three 0

Every variant trains with the same data, seed and steps (the trainer, into OUT/<variant>/); then
the EMA generator of each last checkpoint is evaluated by `g2g_fast.evaluate` on the same held-out
pairs with the same probes. Prints a markdown table and writes OUT/ablation.md, OUT/ablation.json,
OUT/samples/<variant>.png (each variant's final sample grid) and OUT/samples.png (all variants,
first pairs). A variant whose last checkpoint already has the steps is evaluated, not retrained;
one with fewer steps is resumed (exactly). Trainer flags after `--` go to every variant.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from . import cpu_threads
from . import evaluate as E
from . import probes as P
from .checkpoint import CheckpointError, load_checkpoint
from .config import config_to_dict
from .data import DataError
from .options import OneLineErrorParser, UsageError
from .options import build_parser as train_parser
from .options import resolve

ABLATED = {"rl_w": "long reconstruction L1", "fml_w": "long feature matching",
           "fml_mix_rec_w": "mix-reconstruction feature matching"}
VARIANTS = {"all_on": [], "no_long_rec": ["rl_w"], "no_long_fm": ["fml_w"],
            "no_mix_rec_fm": ["fml_mix_rec_w"], "all_off": list(ABLATED)}
# Set by ablate itself (the same for every variant); not accepted after `--`.
RESERVED = ("--approach", "--out", "--steps", "--seed", "--data", "--device", "--resume", "--overwrite",
            "--dry-run")
# Trainer settings that define the data; a checkpoint trained with others is not this ablation's.
DATA_KEYS = ("data", "data_format", "synthetic_classes", "synthetic_per_class", "resize_to")
LOSS_KEYS = ("g_total", "g_adv", "g_long", "g_fm_long", "g_fm_mix_rec", "d_total")
GRID_PAIRS = 4  # pairs per variant in the combined samples.png


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="python -m g2g_fast.ablate", description=__doc__.split("\n\n")[0],
                           epilog="Trainer flags after `--` (e.g. -- --image-size 32 --set nf=8) apply to every variant.")
    p.add_argument("--steps", type=int, help="training steps of every variant (default: the preset's, 300 on CPU)")
    p.add_argument("--out", default="runs/ablation", help="output folder (default: runs/ablation)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder (default: synthetic)")
    p.add_argument("--seed", type=int, default=0, help="seed of every variant's training and of the evaluation (default: 0)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device (default: auto)")
    p.add_argument("--samples", type=int, default=256, help="held-out pairs evaluated per variant (default: 256)")
    p.add_argument("--probe-train", type=int, default=2048, help="training images for the probes (default: 2048)")
    p.add_argument("--probe-steps", type=int, default=P.PROBE_STEPS,
                   help=f"training steps of each image probe (default: {P.PROBE_STEPS})")
    p.add_argument("--probe-cache", metavar="DIR", help=f"probe cache folder (default: {P.default_cache_dir()})")
    p.add_argument("--no-probe-cache", action="store_true", help="always retrain the probes")
    return p


def variant_argv(args, variant: str, passthrough: list[str]) -> list[str]:
    argv = ["--approach", "funit2funit", "--out", str(Path(args.out) / variant), "--seed", str(args.seed),
            "--data", args.data, "--device", args.device]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    argv += passthrough  # after ablate's flags; the variant's --set goes last and wins
    for key in VARIANTS[variant]:
        argv += ["--set", f"{key}=0"]
    return argv


def check_passthrough(passthrough: list[str]) -> None:
    for arg in passthrough:
        flag = arg.split("=", 1)[0]
        if flag == "--overwrite":
            raise UsageError("--overwrite after `--`: ablate resumes a variant that has a checkpoint and replaces "
                             "one that has none; to start over, use another --out or delete it")
        if flag in RESERVED:
            raise UsageError(f"{flag} after `--`: ablate sets it for every variant; give it before `--` "
                             f"(ablate has --out, --steps, --seed, --data, --device) or drop it")


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
    if ckpt.get("config") != config_to_dict(cfg) or any(trainer.get(k) != getattr(opts, k) for k in DATA_KEYS):
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


def combined_grid(grids: dict[str, Path], image_size: int, out: Path) -> None:
    """The first GRID_PAIRS pair blocks of each variant's grid, one labelled row per variant; a
    256-colour preview (the lossless grids are in OUT/samples/), small enough to commit."""
    from PIL import Image, ImageDraw

    from .samples import GAP, SEPARATOR
    width = GRID_PAIRS * (2 * image_size + GAP) + (GRID_PAIRS - 1) * SEPARATOR
    label_h = 14
    rows = []
    for name, path in grids.items():
        with Image.open(path) as im:
            im = im.convert("RGB")
            crop = im.crop((0, 0, min(width, im.width), im.height))
        row = Image.new("RGB", (width, crop.height + label_h), "white")
        row.paste(crop, (0, label_h))
        ImageDraw.Draw(row).text((2, 1), name, fill="black")  # PIL's built-in bitmap font
        rows.append(row)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    top = 0
    for r in rows:
        sheet.paste(r, (0, top))
        top += r.height
    tmp = out.with_name(f".{out.name}.tmp")
    sheet.quantize(colors=256, dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, out)


# ---- the report -------------------------------------------------------------------------------------

COLUMNS = [("short L1", "recon_short_l1"), ("long L1", "recon_long_l1"), ("long PSNR", "recon_long_psnr"),
           ("swap acc", "swap_acc"), ("kept acc", "swap_kept_acc"), ("content err", "content_error"),
           ("leak class<-content", "leak_class_from_content_acc"),
           ("leak factors<-class R2", "leak_factors_from_class_r2")]
LOSS_COLUMNS = [("g_long", "g_long"), ("g_fm_long", "g_fm_long"), ("g_fm_mix_rec", "g_fm_mix_rec")]


def format_report(report: dict) -> str:
    head = ["variant", "off"] + [c for c, _ in COLUMNS] + [c for c, _ in LOSS_COLUMNS] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in report["variants"].items():
        m, loss = v.get("metrics") or {}, v.get("final_losses") or {}
        cells = [name, ", ".join(v["off"]) or "-"]
        cells += ([E.fmt_value(m.get(k)) for _, k in COLUMNS] if v["status"] == "ok"
                  else [v["status"]] + ["-"] * (len(COLUMNS) - 1))
        cells += [E.fmt_value(loss.get(k)) for _, k in LOSS_COLUMNS]
        cells.append(f"{v['train_s']:.0f}" if v.get("train_s") is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    ref = report.get("reference") or {}
    lines += ["", f"{report['steps']} steps per variant, seed {report['seed']}, {report['image_size']}x"
              f"{report['image_size']}, data {report['data']} ({report['heldout']}, {report['samples']} pairs); "
              f"EMA generators. Chance: swap and class-leak accuracy {E.fmt_value(ref.get('swap_chance'))}; "
              f"probes on real images: class accuracy {E.fmt_value(ref.get('probe_class_acc'))}, content error "
              f"{E.fmt_value(ref.get('probe_content_error'))}. Loss columns: each unweighted term's mean over the "
              f"last tenth of training (computed also when its weight is 0). train s: wall time of the "
              f"variant's training, the first one's includes one-time start-up."]
    return "\n".join(lines)


# ---- the three phases: plan (checks everything), train, evaluate --------------------------------

def plan_variants(args, names: list[str], passthrough: list[str]) -> dict:
    """-> {variant: its trainer argv, resolved settings and checkpoint state}; every variant is
    resolved, and so checked, before anything trains."""
    check_passthrough(passthrough)
    plans = {}
    for v in names:
        vargv = variant_argv(args, v, passthrough)
        cfg, opts, _ = resolve(parse_train_args(vargv), None, torch.cuda.is_available())
        ckpt = Path(opts.out) / "checkpoints" / "last.pt"
        plans[v] = SimpleNamespace(argv=vargv, cfg=cfg, opts=opts, ckpt=ckpt, done=checkpoint_state(ckpt, cfg, opts, v))
    return plans


def train_variants(plans: dict, log) -> dict | int:
    """Train (or resume) what is not done -> {variant: (status, train seconds)}, or the trainer's
    exit code when the whole ablation must stop."""
    from .train import main as train_main
    status = {}
    for i, (v, plan) in enumerate(plans.items()):
        run_file = Path(plan.opts.out) / "ablation_run.json"
        prev = json.loads(run_file.read_text()) if run_file.is_file() and plan.done else {}  # none: from scratch
        where = f"variant {v} ({i + 1}/{len(plans)})"
        if plan.done == plan.opts.steps:
            log(f"{where}: done at step {plan.done}, evaluating only")
            status[v] = ("ok", prev.get("train_s"))
            continue
        log(f"{where}: training {plan.opts.steps} steps" + (f", resuming at step {plan.done}" if plan.done else "")
            + (f" with {', '.join(f'{k}=0' for k in VARIANTS[v])}" if VARIANTS[v] else ""))
        t0 = time.time()
        # No checkpoint yet: what an earlier attempt left there (config, metrics) is replaced.
        code = train_main(plan.argv + (["--resume"] if plan.done else ["--overwrite"]))
        if code in (2, 130):  # bad input (the same for every variant) or Ctrl-C: stop here
            return code
        train_s = time.time() - t0 + (prev.get("train_s") or 0.0)
        run_file.write_text(json.dumps({"argv": plan.argv, "train_s": train_s}, indent=2))
        status[v] = ("ok" if code == 0 else f"failed (exit {code})", train_s)  # e.g. a non-finite loss
    return status


def evaluate_variants(args, plans: dict, status: dict, out: Path, log) -> dict:
    """Evaluate every trained variant on the same held-out pairs with the same probes; copy the
    sample grids -> the report (see ablation.json)."""
    from .translate import load_generator
    first = next(iter(plans.values()))
    cfg, opts = first.cfg, first.opts
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    train_set, held, num_classes, identity, where = E.prepare_data(
        opts.data, data_format=opts.data_format, image_size=cfg.image_size, seed=cfg.seed,
        synthetic_classes=opts.synthetic_classes, synthetic_per_class=opts.synthetic_per_class,
        resize_to=opts.resize_to, samples=args.samples, probe_train=args.probe_train)
    cache = None if args.no_probe_cache else (args.probe_cache or P.default_cache_dir())
    probes = E.build_probes(train_set, identity, cache, seed=args.seed, log=log, steps=args.probe_steps)
    report = {"steps": opts.steps, "seed": args.seed, "data": opts.data, "image_size": cfg.image_size,
              "heldout": where, "samples": args.samples,
              "device": device.type + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                       else f" ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"),
              "variants": {}}
    grids = {}
    for v, plan in plans.items():
        st, train_s = status[v]
        entry = {"off": VARIANTS[v], "weights": {k: getattr(plan.cfg, k) for k in ABLATED}, "status": st,
                 "train_s": train_s, "metrics": None,
                 "final_losses": final_losses(Path(plan.opts.out) / "metrics.jsonl")}
        if st == "ok":
            gen, _ = load_generator(SimpleNamespace(funit=None, checkpoint=str(plan.ckpt), raw=False, image_size=None))
            entry["metrics"] = E.evaluate_model(gen.to(device), train_set, held, probes, num_classes,
                                                samples=args.samples, seed=args.seed, device=device)
            (Path(plan.opts.out) / "eval.json").write_text(json.dumps(entry["metrics"], indent=2))
            grid = Path(plan.opts.out) / "samples" / f"step_{plan.opts.steps:07d}.png"
            if grid.is_file():
                grids[v] = out / "samples" / f"{v}.png"
                grids[v].parent.mkdir(exist_ok=True)
                shutil.copyfile(grid, grids[v])
            report.setdefault("reference", {k: entry["metrics"][k] for k in
                                            ("swap_chance", "probe_class_acc", "probe_content_error")})
        report["variants"][v] = entry
    if grids:
        combined_grid(grids, cfg.image_size, out / "samples.png")
    return report


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, passthrough = build_parser().parse_args(argv[:cut]), argv[cut + 1:]
    log = lambda msg: print(f"[g2g] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.time()
    threads = cpu_threads.setup(log)  # once for every variant's training and evaluation in this process
    try:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names:
            raise UsageError(f"--variants {args.variants}: unknown {', '.join(unknown) or 'empty list'}; "
                             f"choose from {', '.join(VARIANTS)}")
        for name in ("samples", "probe_train", "probe_steps"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
        plans = plan_variants(args, names, passthrough)
    except (UsageError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = [v for v, plan in plans.items() if plan.done < plan.opts.steps]
    status = train_variants(plans, log)
    if isinstance(status, int):
        return status
    try:
        report = evaluate_variants(args, plans, status, out, log)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # wall_s: this invocation (training of `trained_now` and every evaluation)
    report = {"command": "python -m g2g_fast.ablate " + " ".join(argv), **report, "trained_now": trained,
              "wall_s": time.time() - t_start}
    table = format_report(report)
    print(table)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    log(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and the samples; {report['wall_s']:.0f}s in all")
    return 0 if all(st == "ok" for st, _ in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
