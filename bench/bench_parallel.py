"""Batch decode throughput on one device against the same batch split over every device, same run.

    python bench/bench_parallel.py                  # CPU: 8 host devices (forced), TAESD and SD KL at 512x512
    python bench/bench_parallel.py --batch 64       # on a multi-GPU/TPU host (real devices; the flag is CPU-only)

One device: `vae.decode` (jit on the first device). Sharded: `flax_vae.data_parallel(vae)` (jit over a mesh)
and `data_parallel(vae, use_pmap=True)`. On CPU the 8 devices share the same cores, so the ratio measures the
cost of sharding (splitting, padding, gathering), not a speed-up. KL uses random weights (timing only).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import flax_vae  # noqa: E402
from flax_vae import kl  # noqa: E402
from flax_vae.family import init_params
from flax_vae.autoencoder import Autoencoder  # noqa: E402


def models():
    yield "taesd", flax_vae.load("taesd")
    config = kl.PRESETS["sd15"]
    yield "sd15 KL", Autoencoder(config, kl.AutoencoderKL(config), init_params(config), "sd15-random")


def images_per_second(decode, z, reps):
    t0 = time.perf_counter()
    decode(z).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        decode(z).block_until_ready()
        times.append(time.perf_counter() - t0)
    return len(z) / statistics.median(times), compile_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"# decode to {args.size}x{args.size}, batch {args.batch}; jax {jax.__version__}, {jax.device_count()} "
          f"{dev.platform} devices ({dev.device_kind}); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print("| model | how | devices | img/s | vs 1 device | compile s |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, vae in models():
        h = args.size // vae.factor
        z = rng.normal(size=(args.batch, h, h, vae.config.latent_channels)).astype(np.float32)
        base = None
        for how, decode, devices in (("vae.decode", vae.decode, 1),
                                     ("data_parallel (mesh)", flax_vae.data_parallel(vae).decode, jax.device_count()),
                                     ("data_parallel (pmap)", flax_vae.data_parallel(vae, use_pmap=True).decode,
                                      jax.local_device_count())):
            rate, compile_s = images_per_second(decode, z, args.reps)
            base = base or rate
            print(f"| {name} | {how} | {devices} | {rate:.2f} | {rate / base:.2f} | {compile_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
