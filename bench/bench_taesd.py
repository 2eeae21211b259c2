"""TAESD encode/decode: flax-vae against diffusers' PyTorch AutoencoderTiny, same weights, same run.

    python bench/bench_taesd.py                      # CPU: 512x512, batch 1 and 8, float32 and bfloat16
    python bench/bench_taesd.py --batch 1 8 32 --reps 10   # on a GPU machine (torch uses CUDA if present)

Prints a markdown table of median wall times (ms per call) and the ratio flax / torch.
"""
import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderTiny

from flax_vae import convert
import flax_vae
from flax_vae.convert.rules import from_flax

DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def torch_model(name, dtype, device):
    """diffusers AutoencoderTiny holding the same weights (converted with our own export rules)."""
    config, params, _ = convert.load(**flax_vae.loading.resolve(name))
    model = AutoencoderTiny(**{k: v for k, v in convert.taesd.diffusers_config(config).items()
                               if not k.startswith("_")})
    state = from_flax(params, convert.taesd.diffusers_rules(config))
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval()


def median_time(fn, reps, sync):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def precision_table(photos):
    """PSNR of bfloat16 / float16 round trips against the float32 round trip, on the bundled photographs."""
    from flax_vae.images import psnr, read_image
    print("\n| model | dtype | PSNR vs float32 round trip (dB), per photo | PSNR vs original (dB), float32 |")
    print("|---|---|---|---|")
    images = [flax_vae.crop_to_multiple(read_image(p)[None], 16) for p in photos]
    for name in ("taesd", "taef1", "taef2"):
        ref = flax_vae.load(name)
        base = [ref.decode(ref.encode(x)) for x in images]
        for dtype in ("bfloat16", "float16"):
            vae = flax_vae.load(name, dtype=getattr(jnp, dtype))
            got = [psnr(np.asarray(vae.decode(vae.encode(x)), np.float32), b) for x, b in zip(images, base)]
            orig = [psnr(b, x) for x, b in zip(images, base)]
            print(f"| {name} | {dtype} | {', '.join(f'{g:.1f}' for g in got)} | "
                  f"{', '.join(f'{o:.2f}' for o in orig)} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="taesd")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precision", action="store_true", help="also print the bf16/fp16 vs fp32 PSNR table")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    jdev = jax.devices()[0]
    print(f"# {args.model} {args.size}x{args.size}; jax {jax.__version__} on {jdev.device_kind} "
          f"({jdev.platform}); torch {torch.__version__} on {device} ({torch.get_num_threads()} threads); "
          f"{platform.processor() or platform.machine()}")
    print("| op | batch | dtype | flax ms | torch ms | flax/torch | flax img/s | flax compile s |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for dtype in args.dtype:
        jdt, tdt = DTYPES[dtype]
        vae = flax_vae.load(args.model, dtype=jdt)
        tm = torch_model(args.model, tdt, device)
        f, c = vae.factor, vae.config.latent_channels
        for batch in args.batch:
            x = rng.uniform(-1, 1, (batch, args.size, args.size, 3)).astype(np.float32)
            z = rng.normal(size=(batch, args.size // f, args.size // f, c)).astype(np.float32)
            for op, data in (("encode", x), ("decode", z)):
                jx = jnp.asarray(data, jdt)
                tx = torch.from_numpy(data.transpose(0, 3, 1, 2).copy()).to(device=device, dtype=tdt)
                jfn = getattr(vae, op)
                t0 = time.perf_counter()
                jfn(jx).block_until_ready()
                compile_s = time.perf_counter() - t0
                tfn = getattr(tm, op)
                with torch.inference_mode():
                    tfn(tx)  # warm-up
                    t_torch = median_time(lambda: tfn(tx)[0], args.reps,
                                          lambda _: torch.cuda.synchronize() if device == "cuda" else None)
                t_flax = median_time(lambda: jfn(jx), args.reps, lambda y: y.block_until_ready())
                print(f"| {op} | {batch} | {dtype} | {t_flax * 1e3:.1f} | {t_torch * 1e3:.1f} | "
                      f"{t_flax / t_torch:.2f} | {batch / t_flax:.1f} | {compile_s:.1f} |", flush=True)
    if args.precision:
        from flax_vae.images import BUNDLED_PHOTOS
        precision_table(BUNDLED_PHOTOS)


if __name__ == "__main__":
    main()
