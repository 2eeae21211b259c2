"""The `flax-vae` command: reconstruct, convert, info, encode-dataset, verify-latents, distill.

Errors are one line on stderr: exit status 2 for a wrong command line, 1 for a failure; --debug (or
FLAX_VAE_DEBUG=1) shows the traceback instead.
"""
import argparse
import functools
import importlib
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import convert, loading
from .images import (
    BUNDLED_PHOTOS,
    IMAGE_SUFFIXES,
    check_writable,
    printable,
    psnr,
    read_image,
    save_grid,
    writing,
)
from .parallel import data_parallel
from .tiling import Tiling

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_MODEL = "taef2"
# The largest image reconstruct encodes and decodes in one piece; larger ones are tiled. 2**21 pixels keeps 1080p
# (1920x1080) whole; XLA plans about 1 KB per pixel for TAESD's encoder and 3.7 KB for the SD 1.5 KL decoder
# (README, Memory): 2 and 7.5 GiB at this size, within a 16 GB TPU core and a 24 GB host.
MAX_PIXELS = 2 ** 21
# job modules and the extra that brings their dependencies (imported by the command that needs them only)
EXTRAS = {"flax_vae.encode_dataset": ("dataset", {"grain", "tqdm"}),
          "flax_vae.train.distill": ("train", {"tensorboardX", "tqdm", "optax", "orbax"})}


class UsageStatus(int):
    """Exit status 2, whose str() is the error message: SystemExit(UsageStatus(message)) exits with status 2 and
    still tells an in-process caller of `main` what was wrong."""

    def __new__(cls, message: str):
        status = super().__new__(cls, 2)
        status.message = message
        return status

    def __str__(self):
        return self.message


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line."""

    def error(self, message):
        line = f"{self.prog}: error: {message} (see {self.prog} --help)"
        print(line, file=sys.stderr)
        raise SystemExit(UsageStatus(line))


def _debug(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("FLAX_VAE_DEBUG", "") not in ("", "0")


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    message = " ".join(lines[0].split()) if lines else ""
    if isinstance(e, (ValueError, OSError)):  # CheckpointError is a ValueError: their messages say it all
        return message or type(e).__name__
    return f"{type(e).__name__}: {message} (--debug shows the traceback)" if message else \
        f"{type(e).__name__} (--debug shows the traceback)"


def _job(module: str, command: str):
    """Import a job module for `command`; a missing extra -> one line naming the fix."""
    extra, needs = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if (e.name or "").split(".")[0] not in needs:
            raise
        sys.exit(f'error: {command} needs the {extra} extra: pip install "flax-vae[{extra}]" ({e})')


HUB_HELP = ("; or a Hugging Face Hub id: org/name, org/name:subfolder (e.g. black-forest-labs/FLUX.1-schnell:vae), "
            "org/name/FILE (an existing local path wins; docs/hub.md)")


def _add_hub_args(p):
    p.add_argument("--subfolder", metavar="DIR", help="the model's folder inside the Hub repository (or the local "
                   "folder), e.g. vae; the same as org/name:vae")
    p.add_argument("--revision", metavar="REV", help="Hub branch, tag or commit hash (default: main)")
    p.add_argument("--variant", metavar="NAME", help="diffusers weights variant on the Hub, e.g. fp16 "
                   "(diffusion_pytorch_model.fp16.safetensors)")


def _add_model_args(p, default=None):
    p.add_argument("--model", help="bundled name (" + ", ".join(loading.BUNDLED) +
                   "), a flax-vae or diffusers folder, a folder of *_encoder/*_decoder files, or one file"
                   + HUB_HELP + (f" (default: {default})" if default else ""))
    p.add_argument("--encoder", help="TAESD encoder file (instead of --model)")
    p.add_argument("--decoder", help="TAESD decoder file (instead of --model)")
    _add_hub_args(p)
    p.set_defaults(parser=p, default_model=default)


def _model_source(args, what="a model") -> dict:
    """The arguments of loading.load / loading.read, checked in the command line's words."""
    source = getattr(args, "src", None) or args.model
    if source and (args.encoder or args.decoder):
        args.parser.error(f"give {what} or --encoder/--decoder, not both")
    hub = {key: getattr(args, key, None) for key in ("subfolder", "revision", "variant")}
    hub = {key: value for key, value in hub.items() if value}
    if args.encoder or args.decoder:
        if hub.keys() - {"revision"}:
            args.parser.error("--subfolder and --variant go with " + what.removeprefix("a ").removeprefix("an ")
                              + ", not with --encoder/--decoder")
        return dict(encoder=args.encoder, decoder=args.decoder, **hub)
    source = source or args.default_model
    if not source:
        args.parser.error(f"give {what} or --encoder/--decoder")
    return dict(source=source, **hub)


def _tile_spec(text: str) -> tuple[int, int | None]:
    """--tile SIZE[:OVERLAP] -> (size, overlap or None)."""
    try:
        size, overlap = [int(v) for v in text.split(":")] if ":" in text else (int(text), None)
    except ValueError:
        size = overlap = -1
    if size <= 0 or (overlap is not None and not 0 < overlap < size):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZE[:OVERLAP] in image pixels with SIZE > OVERLAP "
                                         f"> 0, e.g. 512:128")
    return size, overlap


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number")
    return value


def _tiling(size: int, overlap: int | None, factor: int) -> Tiling:
    """A Tiling for the model's factor; the cross-fade is half the overlap (rounded down to the factor)."""
    if overlap is None:  # a quarter of the tile, a multiple of twice the factor (the cross-fade is half of it)
        overlap = max(2 * factor, size // 4 // (2 * factor) * (2 * factor))
    blend = max(factor, overlap // 2 // factor * factor)
    if size % factor or overlap % factor or not blend <= overlap < size:
        raise ValueError(f"--tile {size}:{overlap}: SIZE and OVERLAP must be multiples of the model's factor "
                         f"{factor}, with SIZE > OVERLAP (e.g. --tile {max(512, 8 * factor)}:{max(128, 2 * factor)})")
    return Tiling(size=size, overlap=overlap, blend=blend)


def _auto_tiling(factor: int) -> Tiling:
    overlap = max(128, 2 * factor)
    return _tiling(max(512, 4 * overlap), overlap, factor)


def output_names(paths) -> list[str]:
    """One output file name per input, never the same twice (also where case is ignored): the input's name with
    its extension, then ".reconstruction.png"; repeats of a name (from other folders) numbered -2, -3, ..."""
    names, taken = [], set()
    for path in paths:
        stem, n = Path(path).name, 1
        name = f"{stem}.reconstruction.png"
        while name.lower() in taken:
            n += 1
            name = f"{stem}.reconstruction-{n}.png"
        taken.add(name.lower())
        names.append(name)
    return names


def reconstruct(args):
    check_writable(args.out, "--out")  # before the model loads: an unwritable --out fails once, at once
    vae = loading.load(**_model_source(args), dtype=DTYPES[args.dtype])
    missing = [p for p in ("encoder", "decoder") if p not in vae.params]
    if missing:
        sys.exit(f"error: reconstruct needs an encoder and a decoder; {vae.name} has no {' and no '.join(missing)}")
    try:
        tile = _tiling(*args.tile, vae.factor) if args.tile else None
    except ValueError as e:
        args.parser.error(str(e))
    auto = _auto_tiling(vae.factor)
    split = _split_rows(vae, args)
    images = [Path(p) for p in args.images] or list(BUNDLED_PHOTOS)
    out = Path(args.out)
    print(f"{vae} on {jax.devices()[0].platform}")
    results, failed = [], []
    for path, name in zip(images, output_names(images)):
        label = path.name if path in BUNDLED_PHOTOS else printable(path)
        try:
            results.append(_reconstruct_one(vae, path, label, out / name, tile, auto, split, args.max_pixels))
        except Exception as e:  # this image only: the others go on
            if _debug(args):
                raise
            failed.append(path)  # reported on stdout, in order with the others; the error line comes at the end
            print(f"{label}: skipped: {_one_line(e).removeprefix(f'{label}: ')}", flush=True)
    if results:
        print(f"mean PSNR {np.mean(results):.3f} dB over {len(results)} images; side-by-sides "
              f"(original | reconstruction) in {printable(out)}/")
    if failed:
        sys.exit(f"error: {len(failed)} of {len(images)} images failed (see above)")


def _split_rows(vae, args):
    """--devices: the model with image rows split over that many devices, or None (one device)."""
    count = args.devices or jax.device_count()
    if count > jax.device_count():
        args.parser.error(f"--devices {count}: this machine has {jax.device_count()} (CPU devices for testing: "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={count})")
    if count == 1:
        return None
    return data_parallel(vae, Mesh(np.array(jax.devices()[:count]), ("space",)), spatial_axis="space")


def _split_roundtrip(split, x):
    """Encode and decode x (1, H, W, 3) with its rows split over devices: padded below by reflection to a height
    that splits evenly (twice the device count in latents), the padding cropped from the result."""
    multiple = 2 * split.mesh.devices.size * split.vae.factor
    padded = np.pad(x, ((0, 0), (0, -x.shape[1] % multiple), (0, 0), (0, 0)), mode="symmetric")
    return np.asarray(split.decode(split.encode(padded)))[:, :x.shape[1]]


def _reconstruct_one(vae, path: Path, label: str, target: Path, tile, auto, split, max_pixels) -> float:
    x = read_image(path)
    h, w = x.shape[0] // vae.factor * vae.factor, x.shape[1] // vae.factor * vae.factor
    if h == 0 or w == 0:
        raise ValueError(f"{x.shape[0]}x{x.shape[1]} is smaller than the model's factor {vae.factor}x{vae.factor}")
    x = x[None, :h, :w]  # top-left crop to a multiple of the model's factor
    roundtrip = lambda x: vae.decode(vae.encode(x, tile=tile), tile=tile)
    if tile is None and h * w > max_pixels and split:
        roundtrip = functools.partial(_split_roundtrip, split)
        print(f"{label}: {h}x{w} is above --max-pixels {max_pixels}: its rows are split over "
              f"{split.mesh.devices.size} devices (exact; --devices 1 to tile instead)", flush=True)
    elif tile is None and h * w > max_pixels:
        tile = auto
        print(f"{label}: {h}x{w} is above --max-pixels {max_pixels}: tiling with {tile.size}:{tile.overlap} tiles "
              f"(memory stays bounded; use --tile to choose)", flush=True)
    timings = []
    for _ in range(1 if tile else 2):  # the first call compiles for this shape, the second is steady state
        t0 = time.perf_counter()
        y = np.asarray(roundtrip(x), np.float32)
        timings.append(time.perf_counter() - t0)
    save_grid(target, [[x[0], y[0]]])
    result = psnr(y, x)
    timing = (f"{timings[0]:.1f} s in {tile.size}:{tile.overlap} tiles (incl. compile)" if tile else
              f"{timings[1] * 1000:.0f} ms/image (first call incl. compile {timings[0]:.1f} s)")
    print(f"{label}: {h}x{w}  PSNR {result:.3f} dB  {timing}  -> {printable(target)}", flush=True)
    return result


def _read(args):
    """The checkpoint as stored (dtype kept): (config, params, name)."""
    return loading.read(**_model_source(args, what="a checkpoint (SRC)"))


def convert_cmd(args):
    if args.out is None:  # one path: OUT, when the parts are given with --encoder/--decoder
        if args.src is None or not (args.encoder or args.decoder):
            args.parser.error("the following arguments are required: OUT")
        args.src, args.out = None, args.src
    check_writable(args.out, "OUT")  # before the checkpoint is read
    config, params, name = _read(args)
    with writing(args.out):
        convert.export(config, params, args.out, to=args.to, name=name, overwrite=args.overwrite)
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
    encode_dataset = _job("flax_vae.encode_dataset", "encode-dataset")
    if args.distributed:  # before anything touches a backend
        n, i = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=n and int(n), process_id=i and int(i))
    if not (args.model or args.encoder or args.decoder):
        args.parser.error("give the model to encode with: --model (or --encoder)")
    source = _model_source(args)
    check_writable(args.output)  # before a model given with Hub options loads, here
    # a plain source goes to encode_dataset as it is (its manifest records it); with Hub options, the model loaded
    model = source["source"] if list(source) == ["source"] else loading.load(**source, dtype=DTYPES[args.dtype])
    encode_dataset.encode_dataset(
        model, args.input, args.output, resolution=args.resolution, buckets=args.buckets,
        bucket_step=args.bucket_step, min_size=args.min_size, batch_size=args.batch_size, shard_size=args.shard_size,
        dtype=DTYPES[args.dtype], logvar=args.logvar, sample=args.sample, seed=args.seed, threads=args.threads)


def verify_latents(args):
    encode_dataset = _job("flax_vae.encode_dataset", "verify-latents")
    manifest, problems = encode_dataset.verify(args.folder)
    c = manifest["counts"]
    if problems:
        print("\n".join(problems))
        sys.exit(f"error: {args.folder}: {len(problems)} problems (listed above)")
    print(f"{args.folder}: OK, {c['shards']} shards with their sha256, {c['encoded']} images encoded and "
          f"{c['skipped']} skipped of {c['inputs']} inputs, each image once")


def distill_cmd(args, rest):
    distill = _job("flax_vae.train.distill", "distill")  # orbax, optax and TensorBoard load for this command only
    return distill.main(rest, prog="flax-vae distill", parser_class=Parser, debug=_debug(args))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flax-vae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (as does "
                        "FLAX_VAE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reconstruct", help="encode and decode images; write original | reconstruction PNGs "
                       "and print PSNR and time per image")
    p.add_argument("images", nargs="*", help="image files (default: the bundled photographs); an image that "
                   "cannot be read is reported and skipped, and the exit status is then 1")
    _add_model_args(p, default=DEFAULT_MODEL)
    p.add_argument("--out", default="reconstructions", help="output folder; each image's side-by-side is "
                   "NAME.EXT.reconstruction.png (a repeated name numbered: NAME.EXT.reconstruction-2.png)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--tile", type=_tile_spec, metavar="SIZE[:OVERLAP]", help="encode and decode in SIZE x SIZE "
                   "tiles (image pixels) that share OVERLAP pixels (default SIZE/4); multiples of the model's "
                   "factor. Bounds memory; models with GroupNorm or attention (taef2, KL, DC-AE) see one tile at "
                   "a time, so larger tiles are closer to the untiled result")
    p.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, metavar="N", help="the largest image "
                   "(height x width after cropping to the model's factor) encoded and decoded in one piece: this "
                   "bounds the memory one image takes (about 1 KB per pixel for TAESD, 3.7 KB for the SD 1.5 KL "
                   "decoder); larger images are split over the devices (--devices) or, on one device, tiled "
                   "(512:128 unless --tile), with a note saying so "
                   f"(default: {MAX_PIXELS} = 2**21, so 1920x1080 stays whole)")
    p.add_argument("--devices", type=_positive, metavar="N", help="split the rows of an image above --max-pixels "
                   "over N devices instead of tiling it: exactly the one-device result, 1/N of its activations on "
                   "each device (the image is padded below by reflection to a height that splits evenly, and the "
                   "padding cropped; default: every device, so one device tiles)")
    p.set_defaults(run=reconstruct)

    p = sub.add_parser("convert", help="convert a checkpoint to flax-vae, diffusers (PyTorch or Flax) or "
                       "madebyollin format",
                       usage="flax-vae convert [-h] (SRC | --encoder FILE [--decoder FILE] | --decoder FILE) OUT "
                             "[--to {flax,diffusers,diffusers-flax,madebyollin}] [--overwrite] [--subfolder DIR] "
                             "[--revision REV] [--variant NAME]")
    p.add_argument("src", nargs="?", metavar="SRC", help="checkpoint (as for reconstruct --model: local, or a Hub id "
                   "org/name[:subfolder]); or use --encoder/--decoder")
    p.add_argument("out", nargs="?", metavar="OUT", help="output folder (a non-empty one only with --overwrite)")
    p.add_argument("--encoder", help="TAESD encoder file")
    p.add_argument("--decoder", help="TAESD decoder file")
    _add_hub_args(p)
    p.add_argument("--to", choices=tuple(convert.EXPORTS), default="flax", help="flax (flax-vae's own), diffusers "
                   "(PyTorch safetensors), diffusers-flax (diffusers 0.39's Flax msgpack, AutoencoderKL), madebyollin "
                   "(TAESD)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (all its files; the new "
                   "folder takes its place only once it is complete)")
    p.set_defaults(run=convert_cmd, model=None, parser=p, default_model=None)

    p = sub.add_parser("info", help="family, variant, channels, factor, parameter count, stored dtype")
    p.add_argument("src", nargs="?", metavar="SRC", help="checkpoint (as for reconstruct --model: local, or a Hub id "
                   "org/name[:subfolder]); or use --encoder/--decoder")
    p.add_argument("--encoder", help="TAESD encoder file")
    p.add_argument("--decoder", help="TAESD decoder file")
    _add_hub_args(p)
    p.set_defaults(run=info, model=None, parser=p, default_model=None)

    p = sub.add_parser("encode-dataset", help="encode a folder of images or webdataset .tar shards into latent "
                       "shards (safetensors) on every device (and host, with --distributed); resumable "
                       "(needs the dataset extra)")
    _add_model_args(p)
    p.add_argument("--input", required=True, help="a folder (searched recursively for images, "
                   f"{' '.join(IMAGE_SUFFIXES)}, and webdataset .tar shards) or one .tar file")
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
                       "shard, counts, no image missing or twice (needs the dataset extra)")
    p.add_argument("folder")
    p.set_defaults(run=verify_latents)

    sub.add_parser("distill", add_help=False, help="distil a tiny TAESD-style encoder/decoder from any teacher "
                   "(options: flax-vae distill --help; the recipe: docs/distillation.md; needs the train extra)")
    return parser


def main(argv=None):
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "distill":
        args = parser.parse_args(argv)  # unknown arguments are errors for every other command
    try:
        return distill_cmd(args, rest) if args.command == "distill" else args.run(args)
    except Exception as e:  # not KeyboardInterrupt or SystemExit (BaseExceptions): one line, no traceback
        if _debug(args):
            raise
        sys.exit(f"error: {_one_line(e)}")


if __name__ == "__main__":
    sys.exit(main())
