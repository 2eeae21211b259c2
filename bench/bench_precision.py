"""bfloat16 and float16 compute against float32, for every family: agreement and speed, measured side by side.

    python bench/bench_precision.py                                     # taesd taef2 kl-small dcae-small
    python bench/bench_precision.py --models kl-sd15 dcae-f32c32 --size 256   # full configurations, crops

Every model computes in float32, bfloat16 and float16 with float32 parameters (`flax_vae.load(src,
dtype=..., param_dtype=jnp.float32)`; Flax casts each layer's parameters to the compute dtype). taesd and taef2
are the bundled real weights; the others are random weights (flax_vae.testing's `MODELS`: the full SD 1.5
KL and DC-AE f32c32 configurations, and the narrow ones tests/test_precision.py checks).

Agreement: PSNR of the reduced-precision encode (latents) and decode (images, decoded from the float32 latents)
against float32, the peak being the float32 output's range, on each of the three bundled photos (cropped to
multiples of 32 as in bench_tiling.py, or their --size x --size centre crops). A dtype whose output overflows
says so (`vae.encode` / `vae.decode` raise FloatingPointError on NaN or inf). Speed: median wall time of
--reps calls of the compiled `encode_fn` / `decode_fn` on the astronaut image, batch 1, after a warm-up call
that compiles; "x fp32" is the ratio to float32 in the same run.
"""
import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import flax_vae
from flax_vae.testing import MODELS, REDUCED_PRECISION, model, photos, precision_agreement

DTYPES = {"float32": jnp.float32, **REDUCED_PRECISION}
ENCODE = jax.jit(flax_vae.encode_fn, static_argnums=0)
DECODE = jax.jit(flax_vae.decode_fn, static_argnums=0)


def crops(size):
    """Centre crops (1, size, size, 3) of the bundled photographs (the full configurations are slow on a CPU)."""
    out = {}
    for name, image in photos().items():
        top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
        out[name] = image[:, top:top + size, left:left + size]
    return out


def median_seconds(fn, reps):
    jax.block_until_ready(fn())  # compiles
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(name, image, reps):
    """{dtype: (encode s, decode s)} of the compiled pure functions (no input or output checks)."""
    z = model(name).encode(image)
    out = {}
    for dtype_name, dtype in DTYPES.items():
        vae = model(name, dtype)
        out[dtype_name] = (median_seconds(lambda: ENCODE(vae.module, vae.params, image), reps),
                           median_seconds(lambda: DECODE(vae.module, vae.params, z), reps))
    return out


def cpu_name():
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    return f"{names[0]} x {len(names)}" if names else platform.processor()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=["taesd", "taef2", "kl-small", "dcae-small"])
    p.add_argument("--size", type=int, help="centre crops of this side (a multiple of 32) instead of the photos")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    images = photos() if args.size is None else crops(args.size)
    device = jax.devices()[0]
    machine = cpu_name() if device.platform == "cpu" else device.device_kind
    print(f"{device.platform}: {machine}, jax {jax.__version__}; "
          + ", ".join(f"{k} {v.shape[2]}x{v.shape[1]}" for k, v in images.items())
          + f"; batch 1, median of {args.reps}\n")
    photo_names = " / ".join(images)
    print(f"| model | dtype | encode PSNR (dB): {photo_names} | decode PSNR (dB): {photo_names} | encode ms | x fp32 "
          "| decode ms | x fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        psnrs, times = precision_agreement(name, images), speed(name, images["astronaut"], args.reps)
        for dtype_name, (te, td) in times.items():
            p = psnrs.get(dtype_name)
            quality = ("- | -" if dtype_name == "float32" else "overflow (FloatingPointError) | " if p is None else
                       " | ".join(" / ".join(f"{v[i]:.1f}" for v in p.values()) for i in (0, 1)))
            print(f"| {name} | {dtype_name} | {quality} | {te * 1e3:.0f} | {te / times['float32'][0]:.2f} | "
                  f"{td * 1e3:.0f} | {td / times['float32'][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
