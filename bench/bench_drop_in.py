"""FlaxAutoencoderKL (diffusers 0.39's interface) against flax-vae's own AutoencoderKL, in one process, interleaved.

The drop-in rearranges its params tree into flax-vae's inside each call and transposes NCHW <-> NHWC at the
boundary, as diffusers' class did. Both run jitted on the SD 1.5 configuration with the same random weights; the
calls alternate (native, native with the same transposes, drop-in), so a busy machine slows all three alike.
diffusers 0.39 itself is measured by bench/bench_kl.py (separate processes: it lives in another venv).

    python bench/bench_drop_in.py --reps 5 [--size 512]
"""
import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import flax_vae
from flax_vae import FlaxAutoencoderKL, convert, family
from flax_vae.testing import random_params


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--size", type=int, default=512)
    args = p.parse_args()
    config = flax_vae.KL_PRESETS["sd15"]
    native = random_params(config)
    tree = convert.to_diffusers_flax(native, config)
    shim = FlaxAutoencoderKL.from_kl_config(config)
    module = family.module(config)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (1, args.size, args.size, 3)).astype(np.float32))
    latents = jnp.asarray(rng.normal(size=(1, args.size // 8, args.size // 8, 4)).astype(np.float32))
    nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))
    calls = {
        "encode": {
            "flax-vae": (lambda p, x: module.apply({"params": p}, x, method="posterior")[0], native, images),
            "flax-vae + NCHW": (lambda p, x: module.apply({"params": p}, jnp.transpose(x, (0, 2, 3, 1)),
                                                          method="posterior")[0], native, nchw(images)),
            "FlaxAutoencoderKL": (lambda p, x: shim.apply({"params": p}, x, method=shim.encode).latent_dist.mean,
                                  tree, nchw(images))},
        "decode": {
            "flax-vae": (lambda p, z: module.apply({"params": p}, z, method="decode"), native, latents),
            "flax-vae + NCHW": (lambda p, z: nchw(module.apply({"params": p}, z, method="decode")), native, latents),
            "FlaxAutoencoderKL": (lambda p, z: shim.apply({"params": p}, z, method=shim.decode).sample, tree,
                                  latents)}}
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    print(f"# SD 1.5 VAE, {args.size}x{args.size}, batch 1, float32, median of {args.reps} interleaved calls; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {platform.processor() or platform.machine()}, "
          f"{'avx512_bf16' if 'avx512_bf16' in flags else 'avx512f' if 'avx512f' in flags else 'avx2'}\n")
    print("| op | implementation | median s | vs flax-vae |")
    print("|---|---|---|---|")
    for op, fns in calls.items():
        jitted = {name: (jax.jit(fn), params, x) for name, (fn, params, x) in fns.items()}
        for fn, params, x in jitted.values():
            jax.block_until_ready(fn(params, x))  # compile
        times = {name: [] for name in jitted}
        for _ in range(args.reps):
            for name, (fn, params, x) in jitted.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(params, x))
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["flax-vae"])
        for name, t in times.items():
            print(f"| {op} | {name} | {statistics.median(t):.3f} | {statistics.median(t) / base:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
