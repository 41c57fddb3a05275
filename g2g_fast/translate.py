"""`python -m g2g_fast.translate`: the G2G forward pass on two images (the paper's Fig. 7).

    python -m g2g_fast.translate --checkpoint runs/g2g/checkpoints/last.pt --content a.jpg --class b.jpg
    python -m g2g_fast.translate --funit animal149_gen.pt --content a.jpg --class b.jpg --out-mix mix.png

Writes a grid (row 1 the inputs, row 2 the mixes, row 3 the two-stage reconstructions); the first
mix is `G(E_A(content), E_B(class))`: the content image rendered with the class image's class.
Images are resized (shorter side) and center-cropped to the model's image size.
"""
from __future__ import annotations

import sys

import torch

from . import cpu_threads
from .checkpoint import CheckpointError, load_checkpoint
from .config import config_from_dict
from .options import OneLineErrorParser, pick_device
from .reference.funit import Generator, load_official_generator
from .reference.g2g import g2g_forward
from .reference.steps import build_approach
from .samples import g2g_grid, load_image, save_png, to_uint8


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="python -m g2g_fast.translate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="a g2g-fast training checkpoint")
    src.add_argument("--funit", metavar="PATH", help="an official FUNIT generator file (uses gen_test)")
    p.add_argument("--content", required=True, metavar="IMG", help="image giving the content (pose, background)")
    p.add_argument("--class", dest="klass", required=True, metavar="IMG", help="image giving the class (identity)")
    p.add_argument("--out", default="translation.png", help="grid output PNG (default: translation.png)")
    p.add_argument("--out-mix", metavar="PNG", help="also write the mix alone to this PNG (default: none)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size (default: the checkpoint's, 128 for --funit)")
    p.add_argument("--raw", action="store_true", help="use the raw generator instead of the EMA one")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device (default: auto)")
    return p


def load_generator(args) -> tuple[torch.nn.Module, int]:
    """-> (generator in eval mode, its image size)."""
    if args.funit:
        gen = Generator()
        load_official_generator(gen, args.funit, "gen" if args.raw else "gen_test", flag="--funit")
        return gen.eval(), args.image_size or 128
    ckpt = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(ckpt["config"]["approach"], ckpt["config"])
    # No pretrained file is read: the checkpoint holds G, and no loss is computed here.
    approach = build_approach(cfg, int(ckpt["num_classes"]), init="inference")
    approach.load_state_dict(ckpt, source=args.checkpoint)
    gen = approach.gen if args.raw or approach.gen_ema is None else approach.gen_ema
    return gen.eval(), args.image_size or cfg.image_size


@torch.no_grad()
def translate(gen, content: torch.Tensor, klass: torch.Tensor):
    """Both G2G stages on one pair: x1 = content image, x2 = class image."""
    return g2g_forward(gen, content, klass)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads = cpu_threads.setup()
    try:
        device = pick_device(args.device)
        gen, size = load_generator(args)
        gen.to(device)
        a = load_image(args.content, size).to(device)
        b = load_image(args.klass, size).to(device)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        print(f"[g2g] {threads}", file=sys.stderr)
    o = translate(gen, a, b)
    save_png(g2g_grid(o.x1, o.x2, o.m1, o.m2, o.r1, o.r2), args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    if args.out_mix:
        save_png(to_uint8(o.m1[0]), args.out_mix)
        print(f"wrote {args.out_mix}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
