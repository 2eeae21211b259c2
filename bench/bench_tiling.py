"""Tiled encode/decode (flax_vae/tiling.py) for every family: agreement with untiled outputs, and memory.

    python bench/bench_tiling.py psnr     # PSNR tiled vs untiled on the bundled photos, by tile size and overlap
    python bench/bench_tiling.py memory   # peak memory of tiled and untiled decodes as the image grows

Models (`MODELS`): taesd and taef2 (bundled real weights; taef2's GroupNorm branch is global), and random
weights for the full SD 1.5 KL and DC-AE f32c32 configurations ("kl-sd15", "dcae-f32c32") and narrow versions of
their structure ("kl-small", "dcae-small": what tests/test_tiling.py and tests/test_precision.py check). KL's
GroupNorm and mid-block attention and DC-AE's linear attention see only their tile, so tiled outputs differ
from untiled ones everywhere.

The models and the memory measurement are flax_vae.testing's (shared with tests/test_tiling.py): "growth" is a
decode's peak RSS growth in a fresh process, "plan" XLA's buffer plan of the model call (arguments + outputs +
temporaries, params included).
"""
import argparse

from flax_vae import Tiling
from flax_vae.testing import MODELS, measure, model, parse_tiling, photos, plan_bytes, tiling_agreement


def psnr_table(args):
    print("| model | photo | tile | overlap | blend | encode PSNR (dB) | decode PSNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        vae = model(name)
        for photo, image in photos().items():
            tilings = [Tiling(size=size, overlap=overlap) for size, overlap in args.tiles
                       if size < max(image.shape[1:3])]
            for t, (enc, dec) in zip(tilings, tiling_agreement(vae, image, tilings)):
                print(f"| {name} | {photo} {image.shape[2]}x{image.shape[1]} | {t.size} | {t.overlap} | "
                      f"{t.checked(vae.factor).blend} | {enc:.1f} | {dec:.1f} |", flush=True)


def memory_table(args):
    tiling = args.tile
    vae = model(args.model)
    f, ch = vae.factor, vae.config.latent_channels
    cells = tiling.size // f
    print(f"{args.model}, decode, float32, batch 1, tiled with {tiling}; MiB\n")
    print("| image | tiled: peak RSS growth | tiled: s | tile call plan | untiled plan | untiled: peak RSS growth |")
    print("|---|---|---|---|---|---|")
    tile_plan = plan_bytes(vae, (tiling.batch, cells, cells, ch))
    for size in args.sizes:
        tiled = measure(args.model, [size], tiling)[size]
        untiled = measure(args.model, [size])[size]["growth"] / 2**20 if size in args.untiled else None
        print(f"| {size}x{size} | {tiled['growth'] / 2**20:.0f} | {tiled['seconds']:.0f} | {tile_plan / 2**20:.0f} | "
              f"{plan_bytes(vae, (1, size // f, size // f, ch)) / 2**20:.0f} | "
              f"{'-' if untiled is None else f'{untiled:.0f}'} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("psnr")
    a.add_argument("--models", nargs="+", default=["taef2", "kl-small", "dcae-small"], choices=MODELS)
    a.add_argument("--tiles", type=lambda s: tuple(map(int, s.split(":"))), nargs="+",
                   default=[(256, 64), (256, 128), (384, 64), (384, 128)], help="size:overlap ...")
    m = sub.add_parser("memory")
    m.add_argument("--model", default="kl-sd15", choices=MODELS)
    m.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    m.add_argument("--tile", type=parse_tiling, default=Tiling(size=512, overlap=128, batch=1),
                   help="size:overlap:batch")
    m.add_argument("--untiled", type=int, nargs="*", default=[1024], help="sizes also decoded untiled")
    args = p.parse_args()
    {"psnr": psnr_table, "memory": memory_table}[args.what](args)


if __name__ == "__main__":
    main()
