"""`python -m g2g_fast.translate`: mix content images with classes, from a checkpoint or a FUNIT file.

    python -m g2g_fast.translate --checkpoint runs/g2g/checkpoints/last.pt --content a.jpg --class b.jpg
    python -m g2g_fast.translate --funit animal149_gen.pt --content dogs/ --class cats/ --class foxes/ --grid g.png
    python -m g2g_fast.translate --funit animal149_gen.pt --content a.jpg b.jpg --class classes/ --k-shot 5 \\
        --out-dir mixes/

Each `--class` is one class (a grid column): one image, several (K-shot: the mean of their class
codes, as FUNIT's test script), or a folder of them; a folder of class sub-folders gives one class
per sub-folder. `--content` takes images and folders of images (grid rows).

Outputs: `--grid PNG` the content x class table (inputs along the edges, labelled; the full paths
in PNG's .json sidecar), `--out-dir DIR` every mix as `<content>__<class>.png`, `--out PNG` (one
content and one class image) the two-image G2G figure: row 1 the inputs, row 2 the mixes, row 3
the two-stage reconstructions (the paper's Fig. 7), `--out-mix PNG` (one content, one class) the
mix alone. With none of --grid, --out-dir, --out and --out-mix, translation.png gets the G2G
figure for one pair, the table otherwise. Images are resized (shorter side) and center-cropped
to the model's size.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cpu_threads, memory_estimate
from .api import Translator, image_files, no_images_message, read_generator
from .checkpoint import CheckpointError
from .data.transforms import image_info, image_problem
from .options import OneLineErrorParser, pick_device
from .run_folder import check_out_file, check_out_folder
from .reference.g2g import g2g_forward
from .samples import TableGrid, g2g_grid, save_png, to_uint8

DEFAULT_OUT = "translation.png"


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="python -m g2g_fast.translate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="a g2g-fast training checkpoint")
    src.add_argument("--funit", metavar="PATH", help="an official FUNIT generator file (uses gen_test)")
    p.add_argument("--content", required=True, nargs="+", action="extend", metavar="IMG|DIR",
                   help="images giving the content (pose, background); a folder: the images in it. Grid rows")
    p.add_argument("--class", dest="klass", required=True, nargs="+", action="append", metavar="IMG|DIR",
                   help="one class (identity), a grid column: an image, several images of the class (K-shot: "
                        "their class codes are averaged) or a folder of them; a folder of class sub-folders: "
                        "one class per sub-folder. Repeat --class for more classes")
    p.add_argument("--k-shot", type=int, default=None, metavar="K",
                   help="use the first K images of each class: files in the order given, a folder's by "
                        "name (default: all)")
    p.add_argument("--grid", metavar="PNG", help="write the content x class table, labelled (+ a .json sidecar)")
    p.add_argument("--out-dir", metavar="DIR", help="write every mix as DIR/<content>__<class>.png (+ mixes.json)")
    p.add_argument("--out", default=None, metavar="PNG",
                   help=f"the two-image G2G figure of one content and one class image (default: {DEFAULT_OUT} "
                        f"when none of --grid, --out-dir, --out-mix is given)")
    p.add_argument("--out-mix", metavar="PNG", help="write the mix of one content and one class alone (given "
                                                    f"alone, the only output: no {DEFAULT_OUT})")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size (default: the checkpoint's, 128 for --funit)")
    p.add_argument("--raw", action="store_true", help="use the raw generator instead of the EMA one")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device (default: auto)")
    return p


def load_generator(args) -> tuple[torch.nn.Module, int]:
    """-> (generator in eval mode, its image size), from --checkpoint or --funit (also `evaluate`'s)."""
    if args.funit:
        return read_generator(args.funit, "funit", args.raw, args.image_size, flag="--funit")
    return read_generator(args.checkpoint, "checkpoint", args.raw, args.image_size)


@torch.no_grad()
def translate(gen, content: torch.Tensor, klass: torch.Tensor):
    """Both G2G stages on one pair: x1 = content image, x2 = class image."""
    return g2g_forward(gen, content, klass)


# ---- inputs -------------------------------------------------------------------------------------

@dataclass
class ClassSpec:
    name: str           # a sub-folder's or folder's name, else the first image's file name stem
    paths: list[Path]   # its K images


def _check_image(path: Path, flag: str) -> Path:
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file or folder")
    info = image_info(str(path))
    if info is None:
        raise ValueError(f"{flag} {path}: not a readable image (jpg, png, bmp, webp; complete)")
    why = image_problem(str(path), info.mode)  # a mode the loaders cannot convert, found before any work
    if why:
        raise ValueError(f"{flag} {path}: {why}")
    return path


def _folder_images(folder: Path, flag: str, check: bool = True) -> list[Path]:
    files = image_files(folder)
    if not files:
        raise ValueError(f"{flag} {folder}: {no_images_message(folder)}")
    return [_check_image(f, flag) for f in files] if check else files


def resolve_contents(items: list[str]) -> list[Path]:
    """--content arguments -> image paths (a folder: its images, by name), each checked."""
    out = []
    for item in map(Path, items):
        out += _folder_images(item, "--content") if item.is_dir() else [_check_image(item, "--content")]
    return out


def resolve_classes(groups: list[list[str]], k_shot: int | None) -> list[ClassSpec]:
    """--class groups -> classes. One group is one class, except a single folder that holds no
    images but class sub-folders: one class per sub-folder. `k_shot`: the first K images of each
    (of a folder, only those are checked; files given by name are checked all)."""
    if k_shot is not None and k_shot < 1:
        raise ValueError(f"--k-shot must be a positive integer, got {k_shot}")
    classes = []
    for group in groups:
        paths = [Path(g) for g in group]
        first = paths[0]
        if len(paths) == 1 and first.is_dir() and not image_files(first):
            subs = [s for s in sorted(first.iterdir()) if s.is_dir() and image_files(s)]
            if not subs:
                raise ValueError(f"--class {first}: {no_images_message(first)} and no class sub-folders with images")
            classes += [ClassSpec(s.name, _folder_images(s, "--class", check=False)) for s in subs]
            continue
        images = []
        for p in paths:
            images += _folder_images(p, "--class", check=False) if p.is_dir() else [_check_image(p, "--class")]
        classes.append(ClassSpec(first.name if first.is_dir() else first.stem, images))
    for c in classes:
        if k_shot is not None and len(c.paths) < k_shot:
            raise ValueError(f"--k-shot {k_shot}: class {c.name!r} has only {len(c.paths)} image(s) "
                             f"({c.paths[0].parent if len(c.paths) > 1 else c.paths[0]})")
        c.paths = [_check_image(p, "--class") for p in c.paths[:k_shot]]
    return classes


def unique_names(names: list[str]) -> list[str]:
    """File-name-safe and distinct: odd characters -> '_', repeats get '-2', '-3', ..."""
    seen, out = set(), []
    for name in names:
        base = re.sub(r"[^\w.-]+", "_", name).strip(".") or "image"
        cand, n = base, 1
        while cand in seen:
            n += 1
            cand = f"{base}-{n}"
        seen.add(cand)
        out.append(cand)
    return out


# ---- outputs ------------------------------------------------------------------------------------

def _label(c: ClassSpec) -> str:
    return c.name if len(c.paths) == 1 else f"{c.name} K={len(c.paths)}"


def write_table(model: Translator, contents: list[Path], classes: list[ClassSpec], grid: str | None,
                out_dir: str | None, source: str, log) -> None:
    """The mixes of every content image with every class, computed in chunks of rows: pasted into
    the --grid table and/or written to --out-dir as they come."""
    codes = model.encode_classes([c.paths for c in classes])
    table = None
    if grid:
        strip = any(len(c.paths) > 1 for c in classes)
        table = TableGrid([p.name for p in contents], [_label(c) for c in classes], model.image_size, strip)
        for j, c in enumerate(classes):
            heads = model.images(c.paths[:1 + TableGrid.THUMBS])
            table.put_class(j, heads[0], heads[1:])
    if out_dir:
        rows, cols = unique_names([p.stem for p in contents]), unique_names([c.name for c in classes])
        files = unique_names([f"{r}__{c}" for r in rows for c in cols])
        index = []
    for r0, x, mixes in model.iter_table(contents, codes):
        for di in range(len(x)):
            i = r0 + di
            if table is not None:
                table.put_content(i, x[di])
            for j in range(len(classes)):
                if table is not None:
                    table.put_mix(i, j, mixes[di, j])
                if out_dir:
                    name = files[i * len(classes) + j] + ".png"
                    save_png(to_uint8(mixes[di, j]), Path(out_dir) / name)
                    index.append({"file": name, "content": str(contents[i]), "class": classes[j].name,
                                  "class_images": [str(p) for p in classes[j].paths]})
    if table is not None:
        save_png(table.canvas, grid)
        x0, y0 = table.cell_xy(0, 0)
        (px, _), (_, py) = table.cell_xy(0, 1), table.cell_xy(1, 0)
        side = {"source": source, "image_size": model.image_size,
                "layout": "row 0: the classes (first image; a K-shot class's next images as thumbnails under "
                          "it); column 0: the content images; cell (i, j): content i with class j",
                "first_mix_xy": [x0, y0], "mix_pitch_xy": [px - x0, py - y0],
                "rows": [str(p) for p in contents],
                "columns": [{"name": c.name, "images": [str(p) for p in c.paths]} for c in classes]}
        sidecar = Path(grid).with_suffix(".json")
        sidecar.write_text(json.dumps(side, indent=2))
        log(f"wrote {grid} ({len(contents)} x {len(classes)} mixes) and {sidecar}")
    if out_dir:
        (Path(out_dir) / "mixes.json").write_text(json.dumps({"source": source, "mixes": index}, indent=2))
        log(f"wrote {len(index)} mixes to {out_dir}/ (index: mixes.json)")


def _plan_outputs(args, n_contents: int, classes: list[ClassSpec]) -> bool:
    """Check which outputs fit the inputs; fills in the default. -> whether --out is drawn."""
    pair = n_contents == 1 and len(classes) == 1
    single = pair and len(classes[0].paths) == 1
    if args.out and not single:
        raise ValueError(f"--out draws the G2G figure of one content and one class image; for "
                         f"{n_contents} content x {len(classes)} class(es) use --grid or --out-dir")
    if args.out_mix and not pair:
        raise ValueError(f"--out-mix writes the mix of one content image and one class; for {n_contents} "
                         f"content x {len(classes)} class(es) use --out-dir")
    if args.out_dir and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ValueError(f"--out-dir {args.out_dir}: is a file, not a folder")
    if args.out_dir:
        check_out_folder(Path(args.out_dir), "--out-dir")
    for flag, path in (("--grid", args.grid), ("--out", args.out), ("--out-mix", args.out_mix)):
        if path and Path(path).is_dir():
            raise ValueError(f"{flag} {path}: is a folder; give a PNG file name")
        if path:
            check_out_file(Path(path), flag, "mix.png")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if not (args.grid or args.out_dir or args.out or args.out_mix):  # only what was asked for
        if single:
            args.out = DEFAULT_OUT
        else:
            args.grid = DEFAULT_OUT
    return bool(args.out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads = cpu_threads.setup()
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        if args.image_size is not None and args.image_size < 1:
            raise ValueError(f"--image-size must be a positive integer, got {args.image_size}")
        device = pick_device(args.device)
        gen, size = load_generator(args)
        contents, classes = resolve_contents(args.content), resolve_classes(args.klass, args.k_shot)
        figure = _plan_outputs(args, len(contents), classes)
        memory_estimate.check_translate(args, size, len(contents), classes, figure, device)  # before any image
        model = Translator(gen, size, device, batch_size=args.batch_size, source=args.checkpoint or args.funit)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        log(f"[g2g] {threads}")
    if figure:  # one pair: both G2G stages, as before K-shot and tables existed
        o = translate(gen, model.images(contents[0]), model.images(classes[0].paths[0]))  # the API's decoding
        save_png(g2g_grid(o.x1, o.x2, o.m1, o.m2, o.r1, o.r2), args.out)
        log(f"wrote {args.out}")
        if args.out_mix:
            save_png(to_uint8(o.m1[0]), args.out_mix)
            log(f"wrote {args.out_mix}")
    elif args.out_mix:
        save_png(to_uint8(model.mix(contents, classes[0].paths)[0]), args.out_mix)
        log(f"wrote {args.out_mix}")
    if args.grid or args.out_dir:
        write_table(model, contents, classes, args.grid, args.out_dir, model.source, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
