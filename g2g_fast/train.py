"""`python -m g2g_fast.train`: train a G2G model; `--help` lists every flag and its default.

The loop: for each step, one batch -> D step -> G step -> EMA (`Approach.train_step`). Host
synchronisation happens once per step for the non-finite check and otherwise at log time.
Outputs in --out: config.json, metrics.jsonl, samples/step_XXXXXXX.png, checkpoints/last.pt
(+ step_XXXXXXX.pt snapshots), TensorBoard scalars/images when tensorboard is installed. One run
per --out: a folder that holds one needs --resume or --overwrite (`run_folder.py`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from . import cpu_threads, distributed, grad_sync, memory_estimate, run_folder
from .backends import BACKENDS
from .checkpoint import CheckpointError, load_checkpoint, set_rng_state, write_failure
from .config import config_to_dict
from .data import DataError, build_dataset, build_stream
from .data.select import check_request as check_loader_request
from .distributed import DistributedError
from .evaluate import TrainingEvaluator
from .options import TrainOptions, UsageError, build_parser, pick_device, read_config_file, resolve
from .reference.steps import build_approach
from .train_io import PhaseTimer, Progress, open_tensorboard, sample_pairs, save, write_samples

log = logging.getLogger("g2g_fast")


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says at which step and what was saved."""


@contextlib.contextmanager
def interrupt_message(message):
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(message()) from None


def saved_note(out: Path, saved: int | None, start: int) -> str:
    """Which checkpoint of this run is on disk, for the messages of a run that stops early."""
    if saved is not None:
        return f"the last checkpoint is {out / 'checkpoints' / 'last.pt'} (step {saved})"
    return f"no checkpoint was written since resuming at step {start}" if start else "no checkpoint was written yet"


def batch_size_given(args) -> bool:
    """Whether the user set the batch size (flag, --set or --config), rather than the checkpoint."""
    sets = {item.split("=", 1)[0].strip() for item in args.set}
    return (args.batch_size is not None or "batch_size" in sets
            or bool(args.config and "batch_size" in read_config_file(args.config)))


def make_backend(opts: TrainOptions):
    if opts.backend == "fast":
        return BACKENDS["fast"](subpixel=bool(opts.subpixel_decoder))
    if opts.subpixel_decoder:
        raise UsageError("--subpixel-decoder is an option of the fast backend; drop it or use --backend fast")
    return BACKENDS[opts.backend]()


def setup(argv, hold: contextlib.ExitStack | None = None):
    """Parse and check everything that can be wrong with the user's input, before training. Rank 0
    takes the lock on --out (`run_folder.lock`) and hands it to `hold`, to be released when the run
    ends; without `hold` (a caller that does not train) it is released on return. On an error the
    lock goes at once, with the folder if it was created for it."""
    with contextlib.ExitStack() as stack:
        ready = _setup(argv, stack)
        if hold is not None:
            hold.enter_context(stack.pop_all())
        return ready


def _setup(argv, stack: contextlib.ExitStack):
    args = build_parser().parse_args(argv)
    if args.overwrite and args.resume is not None:
        raise UsageError("--overwrite and --resume: --resume continues the run in --out, --overwrite "
                         "replaces it; pass one of them")
    ckpt, ckpt_path = None, None
    if args.resume is not None:
        ckpt_path = Path(args.resume or Path(args.out or TrainOptions.out) / "checkpoints" / "last.pt")
        ckpt = load_checkpoint(ckpt_path)
    cfg, opts, preset = resolve(args, ckpt, torch.cuda.is_available())
    out = Path(opts.out)
    run_folder.check_out_folder(out)
    check_loader_request(opts.loader, synthetic=opts.data == "synthetic")
    device = pick_device(opts.device)
    if opts.precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 on the CPU: fp16 autocast is emulated there and runs many times "
                         "slower than fp32; use --precision fp32 or bf16 (fp16 is for CUDA GPUs)")
    # --dry-run after the flag checks, so it fails where the run would (--device cuda without one); it
    # writes nothing, so a run in --out is only pointed out
    if args.dry_run:
        if why := run_folder.refusal(out, ckpt_path, args.overwrite):
            log.warning("note: training would stop here: %s", why)
        print(json.dumps({"preset": preset, "config": config_to_dict(cfg), "trainer": vars(opts)}, indent=2))
        return None
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(opts.data, data_format=opts.data_format, image_size=cfg.image_size,
                            resize_to=opts.resize_to, seed=cfg.seed, synthetic_classes=opts.synthetic_classes,
                            synthetic_per_class=opts.synthetic_per_class, synthetic_family=opts.synthetic_family)
    memory_estimate.check_train(cfg, opts, dataset, device)  # a setting that cannot fit: refused, --out untouched
    # A run in --out is continued (--resume) or replaced (--overwrite), never mixed into. Every rank
    # checks before joining the process group, which waits for all ranks: rank 0 writes only after
    # that, so all ranks see the folder as the user left it.
    run_folder.check(out, ckpt_path, args.overwrite)
    if distributed.env_world()[0] == 0:  # rank 0 locks --out for the run and checks again under the
        stack.enter_context(run_folder.lock(out))  # lock: of two runs started together, one is refused
        run_folder.check(out, ckpt_path, args.overwrite)
    # Under torchrun: join the process group (gloo on CPU, NCCL with cuda:LOCAL_RANK); else a no-op.
    ctx = distributed.init_from_env(device, opts.dist_timeout)
    device = ctx.device
    if ckpt is not None:  # the same images per step when resuming on another number of ranks
        cfg.batch_size = distributed.resume_batch_size(ckpt, cfg.batch_size, explicit=batch_size_given(args))
    if opts.backend == "auto":
        opts.backend = "fast" if device.type == "cuda" else "reference"
    if opts.precision == "auto":
        opts.precision = "bf16" if opts.backend == "fast" and device.type == "cuda" else "fp32"
    if opts.workers < 0:
        opts.workers = 0 if device.type == "cpu" else \
            max(1, min(8, torch.multiprocessing.cpu_count() // ctx.local_world_size))
    approach = build_approach(cfg, dataset.num_classes, device, precision=opts.precision,
                              skip_nonfinite=opts.nan_policy == "skip", backend=make_backend(opts),
                              init="files" if ckpt is None else "resume")
    if ckpt is not None:
        if ckpt.get("num_classes") != dataset.num_classes:
            raise CheckpointError(f"{ckpt_path}: trained on {ckpt.get('num_classes')} classes, "
                                  f"but {opts.data} has {dataset.num_classes}")
        approach.load_state_dict(ckpt, source=str(ckpt_path))
        set_rng_state(ckpt["rng"], device)
        log.info("resumed from %s at step %d", ckpt_path, approach.step)
    if opts.sync_bn and ctx.enabled and not grad_sync.convert_sync_batchnorm(approach.gen):
        log.info("--sync-bn: the %s networks have no BatchNorm; nothing to synchronise", cfg.approach)
    distributed.broadcast_state(approach.gen, approach.gen_ema, approach.dis)  # identical start on every rank
    grad_sync.attach(approach)  # gradients averaged over the ranks
    distributed.seed_rank(cfg.seed, ckpt)
    if ctx.enabled:
        log.info("%d ranks (%s): batch %d per rank, global batch %d%s", ctx.world_size,
                 "nccl" if device.type == "cuda" else "gloo", cfg.batch_size, cfg.batch_size * ctx.world_size,
                 ", BatchNorm synchronised" if opts.sync_bn else "")
    log.info("preset %s | approach %s | %s, %d classes, %d images | %dx%d, batch %d | %s %s %s",
             preset, cfg.approach, opts.data, dataset.num_classes, len(dataset), cfg.image_size,
             cfg.image_size, cfg.batch_size, device, opts.precision, opts.backend)
    if preset == "cpu" and args.preset is None:
        log.info("no CUDA GPU: using the small CPU preset (reduced widths, %dx%d, batch %d); "
                 "on a GPU the default is the paper's configuration", cfg.image_size, cfg.image_size,
                 cfg.batch_size)
    if args.preset is not None and ckpt is not None:
        log.info("--preset %s with --resume: the checkpoint's settings replace the preset", args.preset)
    stream = build_stream(opts.loader, dataset, cfg.batch_size, seed=cfg.seed, start_step=approach.step,
                          device=device, workers=opts.workers, rank=ctx.rank, world_size=ctx.world_size,
                          shots=getattr(cfg, "class_shots", 0))
    if ctx.is_main:  # every check passed: --overwrite's removal, metrics back to the resumed step
        run_folder.prepare(out, approach.step, args.overwrite)
    return approach, opts, dataset, stream


def train(approach, opts: TrainOptions, dataset, stream) -> None:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = approach.cfg
    # Under torchrun only rank 0 writes files, logs, samples and evaluates; every rank trains.
    ctx = distributed.context()
    main_rank = ctx.is_main
    # which backend/kernels/optimiser/precision/loader ran
    run_info = {**approach.backend.describe(approach), "loader": stream.name}
    if ctx.enabled:
        run_info["world_size"] = ctx.world_size
    if main_rank:
        (out / "config.json").write_text(json.dumps(
            {"config": config_to_dict(cfg), "trainer": vars(opts), "num_classes": dataset.num_classes,
             "run": run_info}, indent=2))
    pairs = sample_pairs(dataset, n_pairs=min(8, max(2, dataset.num_classes)))
    tb = open_tensorboard(out, approach.step) if main_rank else None
    # --eval-every: the held-out set and the probes are built once, before the clock starts
    evaluator = TrainingEvaluator(approach, opts, log=log.info) if opts.eval_every and main_rank else None
    if main_rank and approach.device.type == "cpu":
        log.info(cpu_threads.setup())  # what main() chose, now that the input is checked
    timer, progress = PhaseTimer(approach.device), Progress(opts.steps, approach.step)
    start, saved = approach.step, None  # saved: the step of this run's last checkpoint
    t_log, images = time.time(), 0
    # The non-finite check is a host sync: the reference checks every step (the exact step is
    # named); the fast backend accumulates a device-side flag and checks it every N steps and
    # always before a checkpoint is written, so a bad state is never saved.
    check_every = opts.nan_check_every or (1 if approach.backend.name == "reference" else opts.log_every)
    all_finite, window_start = None, approach.step + 1
    # TensorBoard is closed on every exit (its events are flushed only every 2 minutes otherwise).
    with open(out / "metrics.jsonl" if main_rank else os.devnull, "a") as metrics, \
            contextlib.closing(tb) if tb is not None else contextlib.nullcontext(), \
            interrupt_message(lambda: f"interrupted at step {approach.step}; {saved_note(out, saved, start)}"):
        while approach.step < opts.steps:
            cpu_threads.tick()  # follows other processes' load (at most one /proc/stat read per 2 s)
            with timer("data"):  # (x, y), or (x, y, shots) with K-shot class codes (class_shots)
                x, y, *shots = (t.to(approach.device, non_blocking=True) for t in next(stream))
            losses = approach.train_step(x, y, timer, shots=shots[0] if shots else None)
            images += x.shape[0] * ctx.world_size
            step = approach.step
            final = step == opts.steps
            if opts.nan_policy == "stop":
                finite = torch.isfinite(torch.stack(list(losses.values()))).all()
                all_finite = finite if all_finite is None else all_finite & finite
                if step % check_every == 0 or step % opts.ckpt_every == 0 or final:
                    if not bool(grad_sync.all_true(all_finite)):  # every rank stops together
                        where = f"step {step}" if window_start == step else f"steps {window_start}-{step}"
                        bad = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if not torch.isfinite(v))
                        bad = bad or "an earlier step of the window" + (" or another rank" if ctx.enabled else "")
                        raise NonFiniteLoss(f"non-finite loss at {where}: {bad}; training stopped, "
                                            f"{saved_note(out, saved, start)}")
                    all_finite, window_start = None, step + 1
            if step % opts.log_every == 0 or final:
                now = time.time()
                values = {k: v.item() for k, v in grad_sync.mean_losses(losses).items()}  # global batch's
                img_s = images / max(now - t_log, 1e-9)
                record = {"step": step, "epoch": stream.epoch, **values, "img_per_s": img_s,
                          **{f"sec_{k}": v for k, v in timer.collect().items()}, **run_info}
                if approach.skipped:
                    record["skipped_updates"] = approach.skipped
                if approach.device.type == "cpu" and cpu_threads.threads():
                    record["cpu_threads"] = cpu_threads.threads()
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if tb is not None:
                    for k, v in record.items():
                        if k != "step" and isinstance(v, float) and math.isfinite(v):
                            tb.add_scalar(k, v, step)
                if main_rank:
                    progress.update(step, values, img_s, final)
                t_log, images = now, 0
            if main_rank and (step % opts.sample_every == 0 or final):
                write_samples(approach, pairs, out / "samples" / f"step_{step:07d}.png", tb, step)
            if step % opts.ckpt_every == 0 or final:
                save(approach, opts, stream, out, snapshot=True)
                saved = step
            if evaluator is not None and (step % opts.eval_every == 0 or final):
                record = evaluator.record(approach)  # {"step", "eval": {...}, "sec_eval"}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                t_log += record["sec_eval"]  # img/s counts training time only
                if tb is not None:
                    for k, v in record["eval"].items():
                        if isinstance(v, float):
                            tb.add_scalar(f"eval/{k}", v, step)
    log.info("done: %d steps; samples in %s, checkpoint %s", opts.steps, out / "samples",
             out / "checkpoints" / "last.pt")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[g2g] %(message)s", stream=sys.stderr)
    # Before torch's first parallel region; the choice is logged once the input is checked.
    cpu_threads.setup(log.info)
    hold = contextlib.ExitStack()  # the lock on --out (setup takes it), released when the run ends
    try:
        ready = setup(argv, hold)
    except (UsageError, DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        # Bad input is reported as one line, without a traceback.
        print(f"error: {e}", file=sys.stderr)
        distributed.teardown()
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before training started", file=sys.stderr)
        distributed.teardown(clean=False)
        return 130
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.teardown(clean=False)
        return 1
    if ready is None:
        return 0
    ok = False
    try:
        train(*ready)
        ok = True
    except (NonFiniteLoss, DistributedError, DataError) as e:  # DataError: a loader failing mid-run
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Interrupted: says at which step and what was saved
        print(f"\n{str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as e:  # a full disk: one line naming the last good checkpoint
        if (why := write_failure(e, Path(ready[1].out), ready[0].step)) is None:
            raise
        print(f"\nerror: {why}", file=sys.stderr)
        return 1
    finally:
        try:
            if ok:  # the loader's workers / DALI pipeline now, not at garbage collection (ablate runs
                ready[3].close()  # several trainings in one process); after a failure the process exits
        finally:
            try:
                distributed.teardown(clean=ok)
            finally:
                hold.close()
    return 0


def cli(argv=None):
    """The process entry point: `main`'s exit code. A rank of a torchrun job leaves with os._exit
    (every file is written and closed by then), before the process group's backend threads can
    abort the interpreter's shutdown (`distributed.joined`)."""
    try:
        code = main(argv)
    except BaseException:  # an unexpected error (CUDA out of memory, say): its traceback, then exit 1
        if not distributed.joined():
            raise
        traceback.print_exc()
        code = 1
    if distributed.joined():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
