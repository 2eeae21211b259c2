"""`flax-vae encode-dataset` throughput (images/s) and where the time goes, on this machine's default JAX backend.

    python bench/bench_encode_dataset.py                         # TAESD and the SD 1.5 KL encoder, 256 and 512 px
    python bench/bench_encode_dataset.py --models taesd --images 256 --source-size 1536

The dataset: JPEGs (quality 90) of `--source-size` px on the long side, random crops and flips of the bundled
photographs, in a temporary folder. The SD 1.5 KL encoder has random weights (`flax_vae.family.init_params`; no real KL weights
ship), which cost the same time as real ones. For each model and resolution, in one run:
    loading  the host side alone: read, decode, crop and resize every image with the job's loader (same threads)
    compute  the devices alone: the job's encode step on batches already in host memory, after compiling
    job      `encode_dataset` end to end (its step was compiled by the compute measurement: not counted)
Device busy, two estimates: "compute / job" = the compute-alone time of the job's batches / the job's wall time
(on a shared machine the two are measured minutes apart, so load changes move it, even above 100%); and the lower
bound 1 - (time the job waited for images) / (its wall time): after the first batch one batch is always queued on
the devices, so they can only starve while the job waits for images. On a CPU backend the "device" is the same
cores that load the images, so loading and compute compete; on an accelerator they overlap.
"""
import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
from PIL import Image

import flax_vae
from flax_vae import dataset, encode_dataset, kl, parallel
from flax_vae.family import init_params
from flax_vae.autoencoder import Autoencoder
from flax_vae.images import BUNDLED_PHOTOS


def make_dataset(folder: Path, count: int, long_side: int, seed=0):
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in BUNDLED_PHOTOS]
    for i in range(count):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.7, 1)), int(h * rng.uniform(0.7, 1))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        im = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = long_side / max(cw, ch)
        im.resize((round(cw * scale), round(ch * scale)), Image.Resampling.BICUBIC).save(
            folder / f"{i:06d}.jpg", quality=90)


def model(name):
    if name == "taesd":
        return flax_vae.load("taesd")
    config = flax_vae.KL_PRESETS["sd15"]
    return Autoencoder(config, kl.AutoencoderKL(config), init_params(config), "sd15 (random weights)")


def measure(vae, images: Path, resolution, batch_size, threads, work: Path):
    pre = dataset.Preprocessing(resolution, min_size=resolution // 2)
    items = dataset.discover(images)[0]
    t0 = time.perf_counter()
    loaded = list(dataset.load_in_parallel(list(enumerate(items)), pre, threads, prefetch=4 * batch_size))
    loading = time.perf_counter() - t0

    mesh = Mesh(np.array(jax.local_devices()), (parallel.AXIS,))
    params = parallel.replicate(mesh, {"encoder": vae.params["encoder"]})
    batches = [np.stack([x.pixels for x in loaded[i:i + batch_size]]) for i in range(0, len(loaded), batch_size)]
    batches[-1] = np.concatenate([batches[-1], np.zeros((batch_size - len(batches[-1]), *batches[-1].shape[1:]),
                                                        np.uint8)])
    indices = parallel.shard_rows(mesh, np.arange(batch_size, dtype=np.int32))

    def step(pixels):
        return encode_dataset._encode_batch(vae.module, ("latents",), 0, params, parallel.shard_rows(mesh, pixels),
                                            indices)
    jax.block_until_ready(step(batches[0]))  # compile
    t0 = time.perf_counter()
    for b in batches:
        jax.block_until_ready(step(b))
    compute = time.perf_counter() - t0

    # the job's own step: the same function, model, shapes and shardings, so it reuses this compilation
    stats = encode_dataset.encode_dataset(vae, images, work / "out", resolution=resolution, batch_size=batch_size,
                                          shard_size=4 * batch_size, threads=threads, progress=False)
    shutil.rmtree(work / "out")
    n = len(items)
    return dict(loading=n / loading, compute=n / compute, job=n / stats["seconds"], seconds=stats["seconds"],
                busy=compute / stats["seconds"], busy_bound=1 - stats["input_wait"] / stats["seconds"],
                input_wait=stats["input_wait"], device_wait=stats["device_wait"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["taesd", "sd15-kl"], choices=["taesd", "sd15-kl"])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--images", type=int, default=32, help="images per TAESD run")
    ap.add_argument("--kl-images", type=int, nargs=2, default=[8, 4], help="images per KL run at 256 and 512")
    ap.add_argument("--batch-size", type=int, default=8, help="TAESD batch (KL: 4 at 256, 2 at 512)")
    ap.add_argument("--source-size", type=int, default=1024, help="long side of the JPEGs")
    ap.add_argument("--threads", type=int, default=None, help="loading threads (default: one per core)")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count()
    dev = jax.devices()[0]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"# jax {jax.__version__}, {jax.local_device_count()} x {dev.device_kind} ({dev.platform}); host: {cpu}, "
          f"{os.cpu_count()} cores; {threads} loading threads; JPEGs {args.source_size} px long side")
    print("| model | resolution | images | batch | loading img/s | compute img/s | job img/s | job s | "
          "job waited for images s | job waited for devices s | device busy: compute / job | device busy >= |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            vae = model(name)
            for resolution in args.resolutions:
                if name == "taesd":
                    count, batch = args.images, args.batch_size
                else:
                    count, batch = (args.kl_images[0], 4) if resolution <= 256 else (args.kl_images[1], 2)
                images = tmp / "images"
                images.mkdir(exist_ok=True)
                make_dataset(images, count, args.source_size)
                r = measure(vae, images, resolution, batch, threads, tmp)
                shutil.rmtree(images)
                print(f"| {name} | {resolution} | {count} | {batch} | {r['loading']:.1f} | {r['compute']:.2f} | "
                      f"{r['job']:.2f} | {r['seconds']:.1f} | {r['input_wait']:.1f} | {r['device_wait']:.1f} | "
                      f"{r['busy']:.0%} | {r['busy_bound']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
