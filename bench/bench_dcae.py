"""DC-AE f32c32 (sana) in flax-vae vs diffusers' PyTorch AutoencoderDC, same random weights.

    python bench/bench_dcae.py [--reps 3] [--dtypes float32 bfloat16] [--ops decode encode]
    python bench/bench_dcae.py --tiling   # tiled-vs-untiled PSNR on the bundled photos

decode: 16x16x32 latents -> 512x512 image; encode: 512x512 image -> latents. Every (library, op, dtype)
runs in its own subprocess: one warm-up call (JAX compiles there), then --reps timed calls; the table
gives the median and the process's peak memory (peak RSS on CPU; peak device memory on a GPU). Both
libraries run on the default accelerator when there is one (JAX: its default backend; torch: CUDA).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRESET = "dc-ae-f32c32-sana-1.0"
SEED = 0


def config(divisor=1):
    """The preset's configuration, every channel count divided by `divisor` (same structure)."""
    import dataclasses

    from flax_vae.dcae import PRESETS
    c = PRESETS[PRESET]
    return dataclasses.replace(c, latent_channels=c.latent_channels // divisor,
                               encoder_widths=tuple(w // divisor for w in c.encoder_widths),
                               decoder_widths=tuple(w // divisor for w in c.decoder_widths))


def torch_model(config):
    """AutoencoderDC with this configuration and seeded random weights (norm weights and biases included)."""
    import torch
    from diffusers import AutoencoderDC

    from flax_vae.convert.dcae import diffusers_config
    torch.manual_seed(SEED)
    cfg = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    model = AutoencoderDC(**cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if ".norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif ".norm" in name and name.endswith("bias"):
                t.copy_(0.1 * torch.randn_like(t))
    return model


def inputs(op):
    rng = np.random.RandomState(1)
    if op == "encode":
        return rng.uniform(-1, 1, (1, 512, 512, 3)).astype(np.float32)
    return rng.standard_normal((1, 16, 16, 32)).astype(np.float32)


def worker(lib, op, dtype, reps):
    model = torch_model(config())
    x = inputs(op)
    if lib == "jax":
        import jax
        import jax.numpy as jnp

        import flax_vae
        from flax_vae.convert.dcae import from_diffusers
        from flax_vae.dcae import DCAE
        c = config()
        params = from_diffusers({k: v.numpy() for k, v in model.state_dict().items()}, c)
        del model
        dt = jnp.dtype(dtype)
        vae = flax_vae.Autoencoder(c, DCAE(c, dtype=dt), jax.tree.map(lambda a: jnp.asarray(a, dt), params))
        x = jnp.asarray(x, dt)
        run = lambda: getattr(vae, op)(x).block_until_ready()
        device = jax.devices()[0]
    else:
        import torch
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dt = getattr(torch, dtype)
        model = model.to(device, dt)
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device, dt)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def run():
            with torch.inference_mode():
                out = model.encode(t).latent if op == "encode" else model.decode(t).sample
            sync()
            return out
    run()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    where = "RSS"
    if lib == "jax" and device.platform != "cpu":
        peak, where = device.memory_stats().get("peak_bytes_in_use", 0), "device"
    if lib == "torch" and device.type == "cuda":
        peak, where = torch.cuda.max_memory_allocated(), "device"
    print(json.dumps({"median": statistics.median(times), "peak": peak, "where": where, "device": str(device)}))


def benchmark(args):
    rows = []
    for op in args.ops:
        for dtype in args.dtypes:
            res = {}
            for lib in ("jax", "torch"):
                cmd = [sys.executable, __file__, "--worker", lib, op, dtype, "--reps", str(args.reps)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                res[lib] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((op, dtype, res))
            print(f"done {op} {dtype}: {res}", file=sys.stderr)
    print(f"\nf32c32 ({PRESET} configuration, random weights), batch 1, median of {args.reps} after 1 warm-up; "
          f"devices: jax {rows[0][2]['jax']['device']}, torch {rows[0][2]['torch']['device']}\n")
    print("| op | dtype | flax-vae (s) | diffusers (s) | ratio | flax-vae peak (GiB) | diffusers peak (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for op, dtype, r in rows:
        j, t = r["jax"], r["torch"]
        what = "decode 16x16x32 -> 512x512" if op == "decode" else "encode 512x512"
        print(f"| {what} | {dtype} | {j['median']:.4g} | {t['median']:.4g} | {j['median'] / t['median']:.2f}x | "
              f"{j['peak'] / 2**30:.2f} ({j['where']}) | {t['peak'] / 2**30:.2f} ({t['where']}) |")


def tiling_table(args):
    """PSNR (dB) of tiled against untiled DC-AE outputs on the bundled photos (random weights: this measures
    the tiling mechanism against a model with global attention, not reconstruction quality)."""
    import flax_vae
    from flax_vae.convert.dcae import from_diffusers
    from flax_vae.dcae import DCAE
    from flax_vae.images import BUNDLED_PHOTOS, read_image
    c = config(args.divisor)
    params = from_diffusers({k: v.numpy() for k, v in torch_model(c).state_dict().items()}, c)
    vae = flax_vae.Autoencoder(c, DCAE(c), params)
    print(f"{PRESET} structure, widths / {args.divisor}, random weights\n")
    print("| photo (cropped) | tile | overlap | blend | encode PSNR (dB) | decode PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for path in BUNDLED_PHOTOS:
        image = read_image(path)
        image = image[None, :image.shape[0] // 32 * 32, :image.shape[1] // 32 * 32]
        z = vae.encode(image)
        y = vae.decode(z)
        for size, overlap in args.tiles:
            t = flax_vae.Tiling(size=size, overlap=overlap)
            if size >= max(image.shape[1:3]):
                continue
            print(f"| {path.stem} {image.shape[2]}x{image.shape[1]} | {size} | {overlap} | {t.checked(32).blend} | "
                  f"{_psnr(vae.encode(image, tile=t), z):.1f} | {_psnr(vae.decode(z, tile=t), y):.1f} |", flush=True)


def _psnr(a, ref):
    """PSNR with the reference's own range as the peak (random-weight outputs are not in [-1, 1])."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return 10 * np.log10((ref.max() - ref.min()) ** 2 / np.mean((a - ref) ** 2))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--tiling", action="store_true", help="print the tiled-vs-untiled PSNR table instead")
    p.add_argument("--tiles", type=lambda s: tuple(map(int, s.split(":"))), nargs="+",
                   default=[(256, 64), (256, 128), (384, 128), (384, 192)], help="size:overlap ...")
    p.add_argument("--divisor", type=int, default=4, help="--tiling: divide every width by this (CPU time)")
    p.add_argument("--worker", nargs=3, metavar=("LIB", "OP", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker, args.reps)
    elif args.tiling:
        tiling_table(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
