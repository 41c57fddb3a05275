"""The figures of `python -m g2g_fast.ablate`: OUT/curves.png (the runs' loss and --eval-every
curves, one per variant) and OUT/samples.png (the first sample pairs of every variant, one labelled row each)."""
from __future__ import annotations

import os
from pathlib import Path

# Loss panels of curves.png per mode, where the runs have them
CURVE_LOSSES = {"losses": ["g_total", "g_long", "g_fm_long", "g_fm_mix_rec", "d_total"],
                "approaches": ["g_total", "g_long", "d_total"],
                "sweep": ["g_total", "g_long", "g_fm_long", "g_fm_mix_rec", "d_total"]}
GRID_PAIRS = 4  # pairs per variant in the combined samples.png


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


def write_curves(mode: str, plans: dict, out: Path, log) -> str | None:
    """OUT/curves.png: one curve per variant (mean over its seeds, min-max band) of the loss terms
    every run logs and, with --eval-every, of the held-out evaluation -> its name, or None (logged
    why) without matplotlib or without any metrics."""
    from . import plot
    runs, labels = [], []
    for (v, _), plan in plans.items():
        try:
            runs.append(plot.read_run(plan.opts.out))
            labels.append(v)
        except plot.PlotError:  # no metrics.jsonl rows at all: not drawn
            pass
    if not runs:
        log("no curves.png: the runs logged no metrics")
        return None
    have = plot.loss_keys(runs)
    what = "held-out evaluation and losses" if any(r.evals for r in runs) else \
        "losses (no --eval-every rows: pass -- --eval-every N for the evaluation panels)"
    try:
        plot.plot_runs([r.path for r in runs], out / "curves.png", labels,
                       [k for k in CURVE_LOSSES[mode] if k in have],
                       title=f"python -m g2g_fast.ablate ({mode}): {what} during training")
    except plot.PlotError as e:  # matplotlib missing: everything else is written
        log(f"no curves.png: {e}")
        return None
    return "curves.png"
