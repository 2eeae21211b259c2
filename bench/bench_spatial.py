"""Splitting each image's rows over devices (`data_parallel(vae, mesh, spatial_axis="space")`) against one device
and against tiling: memory per device, time, and agreement with the untiled result.

    python bench/bench_spatial.py memory      # XLA's compiled temporaries per device (compiled, not run)
    python bench/bench_spatial.py time        # wall time of a decode (CPU devices share the cores: for information)
    python bench/bench_spatial.py agreement   # split: largest error; tiled: PSNR; both against one untiled device

Runs on 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, unless XLA_FLAGS is set), or on the
accelerators present. Models: random weights for the full SD 1.5 KL and DC-AE f32c32 configurations, and taef2's
real weights (flax_vae.testing). Tiles: 512:128, what `flax-vae reconstruct` uses above --max-pixels.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import flax_vae  # noqa: E402
from flax_vae import testing  # noqa: E402

TILE = flax_vae.Tiling(size=512, overlap=128, blend=64)
MIB = 2 ** 20


def header():
    dev = jax.devices()[0]
    print(f"# {jax.device_count()} x {dev.device_kind} ({dev.platform}); jax {jax.__version__}, flax-vae "
          f"{flax_vae.__version__}; host {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")


def temp_mib(module, params, shape, mesh=None):
    return testing.compiled(module, params, "decode", shape, mesh).memory_analysis().temp_size_in_bytes / MIB


def memory(args):
    print("Decode, float32, batch 1: XLA's temporaries per device (MiB; parameters, "
          "replicated, come on top).\n")
    print("| model | image | one device | one device, banded (as loaded) | one 512:128 tile | "
          f"rows split over {jax.device_count()} | split x n / one device |")
    print("|---|---|---|---|---|---|---|")
    for name, side in [("kl-sd15", 1024), ("kl-sd15", 2048), ("dcae-f32c32", 2048), ("dcae-f32c32", 4096)]:
        vae = testing.model(name)
        split = flax_vae.data_parallel(vae, spatial_axis="space")
        f, c = vae.factor, vae.config.latent_channels
        shape = (1, side // f, side // f, c)
        one = temp_mib(split.module, vae.params, shape)
        banded = temp_mib(vae.module, vae.params, shape) if split.module != vae.module else None
        tile = temp_mib(vae.module, vae.params, (1, TILE.size // f, TILE.size // f, c))
        parts = temp_mib(split.module, vae.params, shape, split.mesh)
        print(f"| {name} | {side}x{side} | {one:.0f} | {'same' if banded is None else f'{banded:.0f}'} | "
              f"{tile:.0f} | {parts:.0f} | {parts * jax.device_count() / one:.2f} |", flush=True)


def best_of(fn, runs=1):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def timing(args):
    print("Decode, float32, batch 1: seconds, one call after a compiling call.\n")
    print(f"| model | image | one device (as loaded) | 512:128 tiles | rows split over {jax.device_count()} |")
    print("|---|---|---|---|---|")
    for name, side in [("kl-sd15", 1024), ("dcae-f32c32", 2048)]:
        vae = testing.model(name)
        split = flax_vae.data_parallel(vae, spatial_axis="space")
        z = np.random.default_rng(0).standard_normal((1, side // vae.factor, side // vae.factor,
                                                      vae.config.latent_channels), np.float32)
        one, tiled = best_of(lambda: vae.decode(z)), best_of(lambda: vae.decode(z, tile=TILE))
        print(f"| {name} | {side}x{side} | {one:.1f} | {tiled:.1f} | {best_of(lambda: split.decode(z)):.1f} |",
              flush=True)


def agreement(args):
    print("The astronaut photograph, 512x512: rows split over the devices, and 256:64 tiles, against one untiled "
          "device.\n")
    print("| model | split: largest error / largest value (encode, decode) | tiled: PSNR dB (encode, decode) |")
    print("|---|---|---|")
    tiles = flax_vae.Tiling(size=256, overlap=64, blend=32)
    x = testing.photos()["astronaut"]
    for name in ("taef2", "kl-sd15", "dcae-f32c32"):
        vae = testing.model(name)
        split = flax_vae.data_parallel(vae, spatial_axis="space")
        z, y = vae.encode(x), vae.decode(vae.encode(x))
        error = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
        (enc, dec), = testing.tiling_agreement(vae, x, [tiles])
        print(f"| {name} | {error(split.encode(x), z):.1e}, {error(split.decode(z), y):.1e} | {enc:.1f}, {dec:.1f} |",
              flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["memory", "time", "agreement"])
    args = p.parse_args()
    header()
    {"memory": memory, "time": timing, "agreement": agreement}[args.what](args)


if __name__ == "__main__":
    main()
