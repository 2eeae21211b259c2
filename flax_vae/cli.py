"""The `flax-vae` command: reconstruct, convert, info, encode-dataset, verify-latents, distill."""
import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax_vae import convert

from . import encode_dataset, loading
from .images import BUNDLED_PHOTOS, psnr, read_image, save_grid

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _add_model_args(p, default=None):
    p.add_argument("--model", default=default, help="bundled name (" + ", ".join(loading.BUNDLED) +
                   "), a flax-vae or diffusers folder, a folder of *_encoder/*_decoder files, or one file"
                   + (f" (default: {default})" if default else ""))
    p.add_argument("--encoder", help="TAESD encoder file (instead of --model)")
    p.add_argument("--decoder", help="TAESD decoder file (instead of --model)")


def _model_source(args):
    source = getattr(args, "src", None) or args.model
    if source and (args.encoder or args.decoder):
        sys.exit("error: give a model or --encoder/--decoder, not both")
    return dict(encoder=args.encoder, decoder=args.decoder) if args.encoder or args.decoder else dict(
        source=source)


def reconstruct(args):
    vae = loading.load(**_model_source(args), dtype=DTYPES[args.dtype])
    images = args.images or BUNDLED_PHOTOS
    print(f"{vae} on {jax.devices()[0].platform}")
    out = Path(args.out)
    results = []
    for path in images:
        x = read_image(path)
        h, w = x.shape[0] // vae.factor * vae.factor, x.shape[1] // vae.factor * vae.factor
        if h == 0 or w == 0:
            print(f"{path}: skipped, smaller than {vae.factor}x{vae.factor}")
            continue
        x = x[None, :h, :w]  # top-left crop to a multiple of the model's factor
        timings = []
        for _ in range(2):  # the first call compiles for this shape, the second is steady state
            t0 = time.perf_counter()
            y = np.asarray(vae.decode(vae.encode(x)), np.float32)
            timings.append(time.perf_counter() - t0)
        target = out / f"{Path(path).stem}_reconstruction.png"
        save_grid(target, [[x[0], y[0]]])
        results.append(psnr(y, x))
        print(f"{Path(path).name}: {h}x{w}  PSNR {results[-1]:.3f} dB  {timings[1] * 1000:.0f} ms/image "
              f"(first call incl. compile {timings[0]:.1f} s)  -> {target}")
    if results:
        print(f"mean PSNR {np.mean(results):.3f} dB over {len(results)} images; side-by-sides "
              f"(original | reconstruction) in {out}/")


def _read(args):
    """The checkpoint as stored (dtype kept): (config, params, name)."""
    source = _model_source(args)
    config, params, name = convert.load(**loading.resolve(**source))
    return config, params, source.get("source") if source.get("source") in loading.BUNDLED else name


def convert_cmd(args):
    config, params, name = _read(args)
    convert.export(config, params, args.out, to=args.to, name=name)
    print(f"wrote {config.family}:{name} as {args.to} to {args.out}")


def info(args):
    config, params, name = _read(args)
    leaves = jax.tree.leaves(params)
    parts = [p for p in ("encoder", "decoder") if p in params]
    print(f"family      {config.family}\nvariant     {name}\nparts       {' + '.join(parts)}\n"
          f"latent ch   {config.latent_channels}\nfactor      {config.factor}\n"
          f"parameters  {sum(int(np.prod(a.shape)) for a in leaves):,}\n"
          f"dtype       {', '.join(sorted({str(a.dtype) for a in leaves}))}\nconfig      {config}")


def encode_dataset_cmd(args):
    if args.distributed:  # before anything touches a backend
        n, i = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=n and int(n), process_id=i and int(i))
    source = _model_source(args)
    if not any(source.values()):
        sys.exit("error: give the model to encode with: --model (or --encoder)")
    model = source.get("source") or loading.load(**source, dtype=DTYPES[args.dtype])
    encode_dataset.encode_dataset(
        model, args.input, args.output, resolution=args.resolution, buckets=args.buckets,
        bucket_step=args.bucket_step, min_size=args.min_size, batch_size=args.batch_size, shard_size=args.shard_size,
        dtype=DTYPES[args.dtype], logvar=args.logvar, sample=args.sample, seed=args.seed, threads=args.threads)


def verify_latents(args):
    manifest, problems = encode_dataset.verify(args.folder)
    c = manifest["counts"]
    if problems:
        sys.exit("\n".join([f"{args.folder}: {len(problems)} problems"] + problems))
    print(f"{args.folder}: OK, {c['shards']} shards with their sha256, {c['encoded']} images encoded and "
          f"{c['skipped']} skipped of {c['inputs']} inputs, each image once")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flax-vae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reconstruct", help="encode and decode images; write original | reconstruction PNGs "
                       "and print PSNR and time per image")
    p.add_argument("images", nargs="*", help="image files (default: the bundled photographs)")
    _add_model_args(p, default="taef2")
    p.add_argument("--out", default="reconstructions", help="output folder")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.set_defaults(run=reconstruct)

    p = sub.add_parser("convert", help="convert a checkpoint to flax-vae, diffusers or madebyollin format")
    p.add_argument("src", nargs="?", help="checkpoint (as for --model); or use --encoder/--decoder")
    p.add_argument("out", help="output folder")
    p.add_argument("--encoder", help="TAESD encoder file")
    p.add_argument("--decoder", help="TAESD decoder file")
    p.add_argument("--to", choices=("flax", "diffusers", "madebyollin"), default="flax")
    p.set_defaults(run=convert_cmd, model=None)

    p = sub.add_parser("info", help="family, variant, channels, factor, parameter count, stored dtype")
    p.add_argument("src", nargs="?", help="checkpoint (as for --model); or use --encoder/--decoder")
    p.add_argument("--encoder", help="TAESD encoder file")
    p.add_argument("--decoder", help="TAESD decoder file")
    p.set_defaults(run=info, model=None)

    p = sub.add_parser("encode-dataset", help="encode a folder of images or webdataset .tar shards into latent "
                       "shards (safetensors) on every device (and host, with --distributed); resumable")
    _add_model_args(p)
    p.add_argument("--input", required=True, help="a folder (searched recursively for .jpg .jpeg .png .webp and "
                   "webdataset .tar shards) or one .tar file")
    p.add_argument("--output", required=True, help="output folder; running the same command again resumes")
    p.add_argument("--resolution", type=int, default=512, help="square size (or bucket area with --buckets)")
    p.add_argument("--buckets", action="store_true", help="SDXL-style aspect-ratio buckets of about "
                   "resolution^2 pixels instead of a square centre crop")
    p.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--min-size", type=int, help="skip images with a shorter side (default: resolution / 2)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step per process (a multiple of "
                   "its device count)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per output shard (the unit of work)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (latents are stored as "
                   "float32)")
    p.add_argument("--logvar", action="store_true", help="also store the posterior log-variance (KL models)")
    p.add_argument("--sample", action="store_true", help="also store one posterior sample per image (KL "
                   "models), seeded by --seed and the image's position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="image loading threads (default: one per CPU core)")
    p.add_argument("--distributed", action="store_true", help="join a multi-process job with "
                   "jax.distributed.initialize() (automatic on TPU pods, SLURM, Open MPI; elsewhere set "
                   "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    p.set_defaults(run=encode_dataset_cmd)

    p = sub.add_parser("verify-latents", help="check an encode-dataset output folder: manifest, sha256 of every "
                       "shard, counts, no image missing or twice")
    p.add_argument("folder")
    p.set_defaults(run=verify_latents)

    sub.add_parser("distill", add_help=False, help="distil a tiny TAESD-style encoder/decoder from any teacher "
                   "(options: flax-vae distill --help; the recipe: train/README.md)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "distill":
        from flax_vae.train import distill  # imported here: orbax and TensorBoard load for this command only
        return distill.main(rest, prog="flax-vae distill")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError: one clear line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
