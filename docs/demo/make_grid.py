"""The README's content x class grid from a demo run (issues 15, 23).

    OMP_NUM_THREADS=1 python docs/demo/make_grid.py RUN_FOLDER OUT.png [--family scheme|shape]

The inputs, rendered by `SyntheticDataset(image_size=32, num_classes=8, per_class=64, seed=7)` (a
data seed no demo run trains on): the first image of classes 0, 2, 4 and 6 as the content images,
the first 3 images of classes 1, 3, 5 and 7 as 3-shot classes. `python -m g2g_fast.translate
--grid` draws the table; this script enlarges it 3x (nearest) and writes the sidecar JSON beside.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from g2g_fast.data import SyntheticDataset

SCALE = 3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--family", default="scheme")
    args = p.parse_args()
    ds = SyntheticDataset(image_size=32, num_classes=8, per_class=64, seed=7, family=args.family)
    with tempfile.TemporaryDirectory() as tmp:
        content, classes = Path(tmp, "content"), Path(tmp, "classes")
        content.mkdir()
        for c in (0, 2, 4, 6):
            Image.fromarray(ds.render(c * 64).permute(1, 2, 0).numpy()).save(content / f"content_c{c}.png")
        for c in (1, 3, 5, 7):
            folder = classes / f"class_{c}_{ds.class_names[c].replace('/', '-')}"
            folder.mkdir(parents=True)
            for k in range(3):
                Image.fromarray(ds.render(c * 64 + k).permute(1, 2, 0).numpy()).save(folder / f"{k}.png")
        grid = Path(tmp, "grid.png")
        subprocess.run([sys.executable, "-m", "g2g_fast.translate", "--checkpoint",
                        str(Path(args.run) / "checkpoints" / "last.pt"), "--content", str(content),
                        "--class", str(classes), "--grid", str(grid)], check=True)
        img = Image.open(grid)
        img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.NEAREST).save(args.out)
        Path(args.out).with_suffix(".json").write_text(grid.with_suffix(".json").read_text())


if __name__ == "__main__":
    main()
