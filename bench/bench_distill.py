"""Distillation acceptance run: a half-width TAESD-style decoder for the TAEF2 latent space (docs/distillation.md).

    python bench/bench_distill.py --out /tmp/distill-taef2-half            # data folders, then the run
    python bench/bench_distill.py --out /tmp/distill-taef2-half --plot-only  # the curve PNG and table again

Data (offline: images that ship inside the installed packages): the bundled photos, scikit-image's, matplotlib's
sample photo and clip-art, scikit-learn's two sample photos. Held out, never trained on: coffee (bundled), rocket,
stereo_motorcycle (left view; the right view is left out too).
The run uses one JAX CPU device per core (XLA_FLAGS=--xla_force_host_platform_device_count), unless XLA_FLAGS is set.
Writes PSNR(student, teacher) at 256x256 against steps, wall time and process CPU time.
Any other flag goes to train.distill and overrides the recipe's (RECIPE): the last occurrence of a flag wins.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HELD_OUT = ("coffee", "rocket", "stereo_motorcycle")
TRAIN = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo",
         "brick", "grass", "gravel", "camera", "moon", "coins", "page", "text", "clock")
MATPLOTLIB = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
SKLEARN = ("china.jpg", "flower.jpg")
RECIPE = ["--teacher", "taef2", "--student", "taesd-half", "--parts", "decoder", "--init", "teacher",
          "--optimizer", "muon", "--steps", "7000", "--crop", "32,64@1000,96@6600", "--lr", "1e-3", "--ema", "0.99",
          "--pool-size", "64", "--pool-reuse", "32", "--eval-every", "200", "--grid-every", "1000",
          "--checkpoint-every", "200"]


def write_photos(root: Path):
    import matplotlib.cbook
    import skimage.data
    import sklearn.datasets

    def save(image, split, name):
        if image.ndim == 3 and image.shape[-1] == 4:  # RGBA over white
            alpha = image[..., 3:] / 255
            image = (image[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        Image.fromarray(image).convert("RGB").save(root / split / f"{Path(name).stem}.png")

    for split, names in (("train", TRAIN), ("eval", HELD_OUT)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            image = getattr(skimage.data, name)()
            save(image[0] if isinstance(image, tuple) else image, split, name)  # stereo pair: the left view
    for name in MATPLOTLIB:
        with Image.open(matplotlib.cbook.get_sample_data(name)) as im:
            save(np.asarray(im), "train", name)
    for name in SKLEARN:
        save(sklearn.datasets.load_sample_image(name), "train", name)


def plot(run: Path, out_png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80, sharey=True)
    for ax, x, label in ((axes[0], "step", "step"), (axes[1], "wall_s", "wall time (min)")):
        xs = [r[x] / (60 if x == "wall_s" else 1) for r in rows]
        ax.plot(xs, [r["psnr_ema"] for r in rows], label="student (EMA weights)")
        ax.plot(xs, [r["psnr"] for r in rows], alpha=0.5, label="student (raw weights)")
        ax.axhline(25, color="gray", linestyle="--", linewidth=1, label="target 25 dB")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs teacher, held-out 256x256 (dB)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (photos go next to it in OUT-data/)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--png", default="docs/images/distill_taef2_half.png")
    args, recipe = parser.parse_known_args()  # the rest goes to train.distill (override the recipe's flags)
    run, photos = Path(args.out), Path(args.out + "-data")
    if not args.plot_only:
        write_photos(photos)
        cmd = [sys.executable, "-m", "train.distill", *RECIPE, "--data", str(photos / "train"),
               "--eval-data", str(photos / "eval"), "--out", str(run), *recipe]
        env = dict(os.environ)
        env.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={os.cpu_count()}")
        print(f"XLA_FLAGS={env['XLA_FLAGS']}", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        print(f"wall {time.perf_counter() - t0:.0f} s")
    rows = plot(run, Path(args.png))
    print("| step | wall (min) | process CPU (min) | PSNR EMA (dB) | PSNR raw (dB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['wall_s'] / 60:.1f} | {r['cpu_s'] / 60:.1f} | {r['psnr_ema']:.2f} | "
              f"{r['psnr']:.2f} |")


if __name__ == "__main__":
    main()
