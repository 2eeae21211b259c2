"""Tiled encode/decode (flax_vae/tiling.py) for every family: agreement with untiled outputs, and memory.

    python bench/bench_tiling.py psnr     # PSNR tiled vs untiled on the bundled photos, by tile size and overlap
    python bench/bench_tiling.py memory   # peak memory of tiled and untiled decodes as the image grows

Models (`MODELS`): taesd and taef2 (bundled real weights; taef2's GroupNorm branch is global), and random
weights for the full SD 1.5 KL and DC-AE f32c32 configurations ("kl-sd15", "dcae-f32c32") and narrow versions of
their structure ("kl-small", "dcae-small": what tests/test_tiling.py and tests/test_precision.py check). KL's
GroupNorm and mid-block attention and DC-AE's linear attention see only their tile, so tiled outputs differ
from untiled ones everywhere.

Memory (on the CPU, where device memory is the process's memory): each measurement runs in a fresh process,
which first compiles the model call it will use (one tile batch, or the whole image), then resets its peak RSS
(/proc/self/clear_refs) and decodes random latents; "growth" is the peak RSS during the decode minus the RSS
before it. "plan" is XLA's buffer plan of the model call (`compiled.memory_analysis()`: arguments + outputs +
temporaries, params included), which needs no run.
"""
import argparse
import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import flax_vae  # noqa: E402
from flax_vae import DCAE, DCAE_PRESETS, KL_PRESETS, AutoencoderKL, KLConfig, Tiling  # noqa: E402
from flax_vae.autoencoder import _decode  # noqa: E402
from flax_vae.images import BUNDLED_PHOTOS, read_image  # noqa: E402

_F32 = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]
CONFIGS = {  # random-weight models: the full configurations, and their structure with narrow widths
    "kl-sd15": KL_PRESETS["sd15"],
    "kl-small": KLConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
    "dcae-f32c32": _F32,
    "dcae-small": dataclasses.replace(_F32, encoder_widths=(16, 16, 32, 32, 64, 64), encoder_depths=(1,) * 6,
                                      decoder_widths=(16, 16, 32, 32, 64, 64), decoder_depths=(1,) * 6),
}
MODELS = ("taesd", "taef2", *CONFIGS)


def model(name, dtype=jnp.float32) -> flax_vae.Autoencoder:
    """A model of `MODELS`, computing in `dtype` with float32 parameters."""
    if name not in CONFIGS:
        return flax_vae.load(name, dtype=dtype, param_dtype=jnp.float32)
    config = CONFIGS[name]
    module = (AutoencoderKL if config.family == "kl" else DCAE)(config, dtype=dtype)
    return flax_vae.Autoencoder(config=config, module=module, params=random_params(module), name=name)


def random_params(module, seed=0):
    """Seeded random parameters for `module`, made on the host: running its Flax init takes XLA half a minute
    on this CPU. Kernels ~ N(0, 1 / fan_in) (Flax's lecun_normal, untruncated); norm scales and variances 1;
    biases and means 0."""
    x = jax.ShapeDtypeStruct((1, module.config.factor, module.config.factor, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.standard_normal(shape.shape, np.float32) / np.sqrt(np.prod(shape.shape[:-1])))
        return jnp.full(shape.shape, float(name in ("scale", "var")), jnp.float32)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def photos():
    """The bundled photographs, (1, H, W, 3), cropped top-left to multiples of 32 (DC-AE's factor) for every
    family alike: astronaut 512x512, coffee 576x384, chelsea 448x288 (width x height)."""
    images = {p.stem: read_image(p) for p in BUNDLED_PHOTOS}
    return {k: v[None, :v.shape[0] // 32 * 32, :v.shape[1] // 32 * 32] for k, v in images.items()}


def psnr(a, ref) -> float:
    """PSNR (dB) of `a` against `ref`, the peak being `ref`'s own range (latents and random-weight outputs
    are not in [-1, 1])."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(10 * np.log10((ref.max() - ref.min()) ** 2 / np.mean((a - ref) ** 2)))


def agreement(vae, image, tilings):
    """[(encode, decode) PSNR of tiled against untiled, per tiling]; decode starts from the untiled latents."""
    z = vae.encode(image)
    y = vae.decode(z)
    return [(psnr(vae.encode(image, tile=t), z), psnr(vae.decode(z, tile=t), y)) for t in tilings]


def psnr_table(args):
    print("| model | photo | tile | overlap | blend | encode PSNR (dB) | decode PSNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        vae = model(name)
        for photo, image in photos().items():
            tilings = [Tiling(size=size, overlap=overlap) for size, overlap in args.tiles
                       if size < max(image.shape[1:3])]
            for t, (enc, dec) in zip(tilings, agreement(vae, image, tilings)):
                print(f"| {name} | {photo} {image.shape[2]}x{image.shape[1]} | {t.size} | {t.overlap} | "
                      f"{t.checked(vae.factor).blend} | {enc:.1f} | {dec:.1f} |", flush=True)


# ---- memory

def _status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))


def plan_bytes(vae, latent_shape) -> int:
    """XLA's buffer plan of one decode call on latents of this shape, params included."""
    spec = jax.ShapeDtypeStruct(latent_shape, jnp.float32)
    m = _decode.lower(vae.module, vae.params, spec).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def worker(name, sizes, tiling):
    """Decode (size x size) images from random latents, one size after the other; print each decode's peak RSS
    growth (bytes) and time as JSON."""
    vae = model(name)
    c = vae.config
    if tiling is not None:  # compile the tile-batch call every size uses, and pay the first run's one-time costs
        cells = tiling.size // c.factor  # `batch` tiles side by side make at least `batch` tiles
        vae.decode(np.zeros((1, cells, tiling.batch * cells, c.latent_channels), np.float32), tile=tiling)
    results = {}
    for size in sizes:
        z = np.random.default_rng(0).standard_normal((1, size // c.factor, size // c.factor, c.latent_channels),
                                                     dtype=np.float32)
        if tiling is None:
            decode = _decode.lower(vae.module, vae.params, z).compile()
            run = lambda: decode(vae.params, z)
        else:
            run = lambda: vae.decode(z, tile=tiling)
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, or this decode could reuse it unseen
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := RSS now (a compilation's or the previous size's peak is not this decode's)
        before = _status("VmRSS")
        start = time.perf_counter()
        out = jax.block_until_ready(run())
        results[size] = {"growth": _status("VmHWM") - before, "seconds": time.perf_counter() - start}
        del out
    print(json.dumps(results))


def measure(name, sizes, tiling=None, timeout=None):
    """`worker` in a fresh process: {size: {"growth": bytes, "seconds": s}}."""
    spec = "none" if tiling is None else f"{tiling.size}:{tiling.overlap}:{tiling.batch}"
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))  # RSS: CPU only
    out = subprocess.run([sys.executable, __file__, "worker", name, spec, *map(str, sizes)], capture_output=True,
                         text=True, env=env, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"memory worker {name} {spec} {sizes} failed:\n{out.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


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


def parse_tiling(text):
    size, overlap, batch = map(int, text.split(":"))
    return Tiling(size=size, overlap=overlap, batch=batch)


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
    w = sub.add_parser("worker")
    w.add_argument("name", choices=MODELS)
    w.add_argument("tiling", help="size:overlap:batch, or none")
    w.add_argument("sizes", type=int, nargs="+")
    args = p.parse_args()
    if args.what == "worker":
        worker(args.name, args.sizes, None if args.tiling == "none" else parse_tiling(args.tiling))
    else:
        {"psnr": psnr_table, "memory": memory_table}[args.what](args)


if __name__ == "__main__":
    main()
