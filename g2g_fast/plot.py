"""`python -m g2g_fast.plot`: learning curves of training runs as a PNG (issue 15).

    python -m g2g_fast.plot runs/g2g                         # -> runs/g2g/curves.png
    python -m g2g_fast.plot runs/a runs/b --out cmp.png      # both runs' curves overlaid
    python -m g2g_fast.plot runs/abl/*/seed_* --group parent # one curve per variant: mean, min-max band

Reads each run's `metrics.jsonl`: the loss rows every run has (every `--log-every` steps) and the
evaluation rows that `--eval-every N` writes (`{"step", "eval": {...}}`). Panels, when some run has
evaluation rows: class swap (swap and kept accuracy, with chance), content error of the mixes (with
the probe's own error on real images), both leakages (class from content codes, with chance;
content factors from class codes), reconstruction PSNR (long and short); then one panel per loss
term (a moving average). A run without evaluation rows gets the loss panels alone.
Runs with the same label (`--labels`, or `--group parent`: the parent folder's name) form one
curve: the mean over those runs at the steps they all have, with a band from their minimum to
their maximum (e.g. the seeds of one variant).

Needs matplotlib, an optional extra: `pip install -e ".[plot]"`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .options import OneLineErrorParser

INSTALL = 'pip install -e ".[plot]"'
# (title, [(eval key, series name, line style)], reference: (eval key, its name) or None)
EVAL_PANELS = [
    ("class swap: probe accuracy on the mixes", [("swap_acc", "swap (x2's class)", "-"),
                                                 ("swap_kept_acc", "kept (x1's class)", "--")],
     ("swap_chance", "chance")),
    ("content error of the mixes (std units, 0 best)", [("content_error", "vs content image", "-"),
                                                        ("content_error_to_class", "vs class image", "--")],
     ("probe_content_error", "probe on real images")),
    ("leakage: class from content codes (accuracy)", [("leak_class_from_content_acc", "accuracy", "-")],
     ("leak_class_chance", "chance")),
    ("leakage: content factors from class codes (R², 0 best)", [("leak_factors_from_class_r2", "R²", "-")], None),
    ("reconstruction PSNR (dB)", [("recon_long_psnr", "long (two-stage)", "-"),
                                  ("recon_short_psnr", "short", "--")], None),
]
FIXED_YLIM = {EVAL_PANELS[0][0]: (0, 1.02), EVAL_PANELS[2][0]: (0, 1.02), EVAL_PANELS[3][0]: (0, 1.02)}
COLUMNS = 4
SMOOTH_FRACTION = 20  # loss curves: moving average over 1/20 of a run's loss rows (at least 1)


class PlotError(ValueError):
    """Bad input: one `error:` line, exit code 2."""


@dataclass
class Run:
    path: Path
    evals: list[dict] = field(default_factory=list)    # {"step", **metrics}
    losses: list[dict] = field(default_factory=list)   # {"step", "g_...": v, "d_...": v}
    skipped: int = 0                                   # unreadable lines (a run killed mid-write)


def read_run(path: str | os.PathLike) -> Run:
    """A run folder -> its evaluation and loss rows (either may be empty); PlotError naming the path
    when it is not a run folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise PlotError(f"{folder}: no such run folder")
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"{metrics}: no such file (is {folder} the --out folder of a training run?)")
    run = Run(folder)
    try:
        text = metrics.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{metrics}: cannot read ({e})") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            run.skipped += 1
            continue
        if isinstance(row.get("eval"), dict):
            run.evals.append({"step": step, **{k: v for k, v in row["eval"].items() if _number(v)}})
        else:
            terms = {k: v for k, v in row.items() if k.startswith(("g_", "d_")) and _number(v)}
            if terms:
                run.losses.append({"step": step, **terms})
    return run


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def default_labels(paths: list[Path]) -> list[str]:
    """Each run's folder name; where two runs share it, the shortest path suffix that tells them
    apart (`all_on/seed_0`)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    labels = []
    for i, pi in enumerate(parts):
        for n in range(1, len(pi) + 1):
            label = "/".join(pi[-n:])
            if all(j == i or pj == pi or "/".join(pj[-n:]) != label for j, pj in enumerate(parts)):
                break
        labels.append(label)
    return labels


def loss_keys(runs: list[Run]) -> list[str]:
    """Every loss term of the runs: g_total, the other g_ terms, d_total, the other d_ terms."""
    seen: list[str] = []
    for r in runs:
        for row in r.losses:
            seen += [k for k in row if k != "step" and k not in seen]
    return sorted(seen, key=lambda k: (not k.startswith("g_"), not k.endswith("_total"), seen.index(k)))


def default_out(paths: list[Path]) -> Path:
    common = Path(os.path.commonpath([os.path.abspath(p) for p in paths]))
    if common == Path(common.anchor):
        raise PlotError("the runs share no folder to write curves.png into; pass --out FILE.png")
    return common / "curves.png"


def _series(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _group(per_run: list[dict[int, float]]):
    """Series of the runs of one group -> (steps all have, mean, min, max)."""
    steps = sorted(set.intersection(*(set(s) for s in per_run))) if per_run else []
    cols = [[s[t] for s in per_run] for t in steps]
    return steps, [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot_runs(paths: list[str | os.PathLike], out: str | os.PathLike | None = None,
              labels: list[str] | None = None, losses: list[str] | None = None, title: str | None = None,
              log=None) -> Path:
    """Draw the curves of `paths` into a PNG -> its path. Runs with equal labels are one curve (mean
    over them, min-max band). `losses`: the loss panels (default: every term; [] for none). Every
    input is checked (PlotError) before matplotlib is needed."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise PlotError("no run folder given")
    runs = [read_run(p) for p in paths]
    labels = list(labels) if labels is not None else default_labels(paths)
    if len(labels) != len(runs):
        raise PlotError(f"--labels: {len(labels)} labels for {len(runs)} run folders")
    available = loss_keys(runs)
    if losses is None:
        losses = available
    unknown = [k for k in losses if k not in available]
    if unknown:
        raise PlotError(f"--losses: no run has {', '.join(unknown)} (they have: {', '.join(available) or 'none'})")
    with_evals = any(r.evals for r in runs)
    if not with_evals and not available:  # e.g. a run stopped before its first --log-every step
        raise PlotError(f"{runs[0].path / 'metrics.jsonl'}: no loss or evaluation rows yet" if len(runs) == 1
                        else f"none of the {len(runs)} runs has loss or evaluation rows in its metrics.jsonl")
    if not with_evals and not losses:
        raise PlotError("--losses none: no run has evaluation rows, so nothing is left to draw; drop "
                        "--losses none, or train with --eval-every N for the evaluation panels")
    out = check_out(Path(out) if out is not None else default_out(paths))
    if log:
        for r in runs:
            if r.skipped:
                log(f"{r.path / 'metrics.jsonl'}: skipped {r.skipped} unreadable line(s)")
        bare = [str(r.path) for r in runs if not r.evals]
        if bare:
            log(f"{', '.join(bare)}: no evaluation rows, " + ("loss curves only" if losses else "not drawn")
                + " (train with --eval-every N for the evaluation panels)")
    fig = make_figure(runs, labels, losses, title, evals=with_evals)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    buf.seek(0)
    from PIL import Image
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(buf) as im:  # a 256-colour PNG: a third of the size, small enough to commit
            im.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)
        os.replace(tmp, out)
    except OSError as e:
        raise PlotError(f"--out {out}: cannot write ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):  # a write that failed half-way leaves no stray temp file
            tmp.unlink(missing_ok=True)
    return out


def check_out(out: Path) -> Path:
    """--out: a PNG file name, whose folder is a folder (checked before any drawing)."""
    if out.is_dir():
        raise PlotError(f"--out {out}: is a folder; give a PNG file name, e.g. {out / 'curves.png'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise PlotError(f"--out {out}: {parent} is a file, not a folder")
    return out


def make_figure(runs: list[Run], labels: list[str], losses: list[str], title: str | None = None,
                evals: bool = True):
    """-> the matplotlib Figure (no pyplot, no global state). Panels in order: EVAL_PANELS (unless
    `evals` is False), then one per loss term in `losses`."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotError(f"python -m g2g_fast.plot needs matplotlib, an optional extra: {INSTALL}") from None
    groups: dict[str, list[Run]] = {}
    for label, run in zip(labels, runs):
        groups.setdefault(label, []).append(run)
    colors = matplotlib.colormaps["tab10"].colors
    color = {g: colors[i % len(colors)] for i, g in enumerate(groups)}
    eval_panels = EVAL_PANELS if evals else []
    n_panels = len(eval_panels) + len(losses)
    ncols = min(COLUMNS, n_panels)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[n_panels:]:
        ax.set_visible(False)

    def draw(ax, key, style):  # line labels "<group>: <key>" (the panel legends are built by hand)
        drawn = False
        for g, members in groups.items():
            steps, mean, lo, hi = _group([_series(r.evals, key) for r in members])
            if not steps:
                continue
            ax.plot(steps, mean, style, color=color[g], lw=1.4, label=f"{g}: {key}")
            if len(members) > 1:
                ax.fill_between(steps, lo, hi, color=color[g], alpha=0.15, lw=0)
            drawn = True
        return drawn

    for ax, (name, series, ref) in zip(axes, eval_panels):
        drawn = False
        for key, _, style in series:
            drawn |= draw(ax, key, style)
        if ref is not None:  # the same for every run of one dataset: the first run's last value
            value = next((r.evals[-1][ref[0]] for r in runs if r.evals and ref[0] in r.evals[-1]), None)
            if value is not None:
                ax.axhline(value, color="0.5", ls=":", lw=1)
        if len(series) > 1 or ref is not None:  # which line style is which
            handles = [Line2D([], [], color="0.2", ls=s, label=n) for _, n, s in series]
            if ref is not None:
                handles.append(Line2D([], [], color="0.5", ls=":", label=ref[1]))
            ax.legend(handles=handles, loc="best", fontsize=7, frameon=False)
        if not drawn:
            ax.text(0.5, 0.5, "n/a for this data", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name in FIXED_YLIM:  # accuracies and R^2 on their whole range: a swing reads as its size
            ax.set_ylim(*FIXED_YLIM[name])
        elif name == EVAL_PANELS[1][0]:
            ax.set_ylim(bottom=0)

    for ax, key in zip(axes[len(eval_panels):], losses):
        for g, members in groups.items():
            smoothed = []
            for r in members:
                rows = [row for row in r.losses if key in row]
                if not rows:
                    continue
                window = max(1, len(rows) // SMOOTH_FRACTION)
                values = [row[key] for row in rows]
                if len(members) == 1 and window > 1:  # one run: its raw values too, faint
                    ax.plot([row["step"] for row in rows], values, color=color[g], lw=0.5, alpha=0.25, label="_raw")
                smoothed.append(dict(zip((row["step"] for row in rows), _smooth(values, window))))
            steps, mean, lo, hi = _group(smoothed)
            if steps:
                ax.plot(steps, mean, color=color[g], lw=1.4, label=f"{g}: {key}")
                if len(smoothed) > 1:
                    ax.fill_between(steps, lo, hi, color=color[g], alpha=0.15, lw=0)
        ax.set_title(f"loss {key} (moving average)", fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    for ax in axes[:n_panels]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_size(8)
    handles = [Line2D([], [], color=color[g], lw=2, label=g + (f" ({len(m)} runs)" if len(m) > 1 else ""))
               for g, m in groups.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False, fontsize=8,
               title="line: the mean of a label's runs, band: their min-max" if any(
                   len(m) > 1 for m in groups.values()) else None, title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m g2g_fast.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folders (a trainer's --out)")
    p.add_argument("--out", metavar="FILE.png",
                   help="output PNG (default: RUN_DIR/curves.png; several runs: curves.png in their common folder)")
    p.add_argument("--labels", help="comma-separated label per run (default: the folder names); runs with the "
                                    "same label are one curve: their mean, with a min-max band")
    p.add_argument("--group", choices=["run", "parent"], default="run",
                   help="parent: label each run by its parent folder, so e.g. OUT/<variant>/seed_*/ give one "
                        "curve per variant (default: run)")
    p.add_argument("--losses", help="comma-separated loss terms to draw, or 'none' (default: every g_/d_ term)")
    p.add_argument("--title", help="figure title (default: none)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(f"[g2g] {msg}", file=sys.stderr)  # noqa: E731
    try:
        labels = None
        if args.labels is not None and args.group == "parent":
            raise PlotError("--labels and --group parent: give one of them")
        if args.labels is not None:
            labels = [s.strip() for s in args.labels.split(",")]
        elif args.group == "parent":
            labels = [Path(os.path.abspath(p)).parent.name for p in args.runs]
        losses = None if args.losses is None else \
            [] if args.losses.strip() == "none" else [s.strip() for s in args.losses.split(",") if s.strip()]
        out = plot_runs(args.runs, args.out, labels, losses, args.title, log)
    except (PlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
