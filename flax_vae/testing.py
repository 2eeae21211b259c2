"""Random-weight models, photographs and measurements shared by the tests and the benchmarks (bench/).

    python -m flax_vae.testing worker NAME SIZE:OVERLAP:BATCH|none SIZE...   # one memory measurement (`measure`)

Models (`MODELS`): taesd and taef2 (bundled real weights; taef2's GroupNorm branch is global), and random
weights for the full SD 1.5 KL and DC-AE f32c32 configurations ("kl-sd15", "dcae-f32c32") and narrow versions of
their structure ("kl-small", "dcae-small").

Memory (on the CPU, where device memory is the process's memory): each measurement runs in a fresh process,
which first compiles the model call it will use (one tile batch, or the whole image), then resets its peak RSS
(/proc/self/clear_refs) and decodes random latents; "growth" is the peak RSS during the decode minus the RSS
before it. `plan_bytes` is XLA's buffer plan of the call (`compiled.memory_analysis()`), which needs no run.
"""
import argparse
import ctypes
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from . import family
from .autoencoder import Autoencoder, decode_fn, encode_fn
from .dcae import PRESETS as DCAE_PRESETS
from .images import BUNDLED_PHOTOS, read_image
from .kl import PRESETS as KL_PRESETS
from .kl import KLConfig
from .loading import load
from .parallel import split_rows_sharding
from .tiling import Tiling

_F32 = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]
CONFIGS = {  # random-weight models: the full configurations, and their structure with narrow widths
    "kl-sd15": KL_PRESETS["sd15"],
    "kl-small": KLConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
    "dcae-f32c32": _F32,
    "dcae-small": dataclasses.replace(_F32, encoder_widths=(16, 16, 32, 32, 64, 64), encoder_depths=(1,) * 6,
                                      decoder_widths=(16, 16, 32, 32, 64, 64), decoder_depths=(1,) * 6),
}
MODELS = ("taesd", "taef2", *CONFIGS)


def model(name, dtype=jnp.float32) -> Autoencoder:
    """A model of `MODELS`, computing in `dtype` with float32 parameters."""
    if name not in CONFIGS:
        return load(name, dtype=dtype, param_dtype=jnp.float32)
    config = CONFIGS[name]
    return Autoencoder(config=config, module=family.module(config, dtype), params=random_params(config), name=name)


def random_params(config, seed=0):
    """Seeded random parameters for `config`, made on the host (a full configuration's Flax init compiles and
    runs the whole model). Kernels ~ N(0, 1 / fan_in) (Flax's lecun_normal, untruncated); norm scales and
    variances 1; biases and means 0."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if path[-1].key == "kernel":
            return jnp.asarray(rng.standard_normal(shape.shape, np.float32) / np.sqrt(np.prod(shape.shape[:-1])))
        return jnp.full(shape.shape, float(path[-1].key in ("scale", "var")), jnp.float32)
    return jax.tree_util.tree_map_with_path(leaf, family.param_shapes(config))


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


def tiling_agreement(vae, image, tilings):
    """[(encode, decode) PSNR of tiled against untiled, per tiling]; decode starts from the untiled latents."""
    z = vae.encode(image)
    y = vae.decode(z)
    return [(psnr(vae.encode(image, tile=t), z), psnr(vae.decode(z, tile=t), y)) for t in tilings]


REDUCED_PRECISION = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}


def precision_agreement(name, images):
    """{dtype: {image: (encode PSNR, decode PSNR)} against float32, or None where the output overflows}."""
    vae = model(name)
    z32 = {k: vae.encode(x) for k, x in images.items()}
    y32 = {k: vae.decode(z) for k, z in z32.items()}
    out = {}
    for dtype_name, dtype in REDUCED_PRECISION.items():
        vae = model(name, dtype)
        try:
            out[dtype_name] = {k: (psnr(vae.encode(x), z32[k]), psnr(vae.decode(z32[k]), y32[k]))
                               for k, x in images.items()}
        except FloatingPointError:
            out[dtype_name] = None
    return out


# ---- memory

def _status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))


def plan_bytes(vae, latent_shape) -> int:
    """XLA's buffer plan of one decode call on latents of this shape, params included."""
    m = compiled(vae.module, vae.params, "decode", latent_shape).memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def compiled(module, params, what: str, shape, mesh=None):
    """XLA's compiled program (not run) of "encode" or "decode" on float32 inputs of `shape`: on one device, or
    with rows split over the "space" axis of `mesh` (the layout of `split_rows_sharding`)."""
    fn = functools.partial({"encode": encode_fn, "decode": decode_fn}[what], module)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    if mesh is None:
        return jax.jit(fn).lower(params, x).compile()
    rows = split_rows_sharding(mesh)
    return jax.jit(fn, in_shardings=(NamedSharding(mesh, PartitionSpec()), rows),
                   out_shardings=rows).lower(params, x).compile()


def all_gathers(program) -> list[tuple[int, ...]]:
    """The shapes a compiled program all-gathers (whole tensors assembled on every device)."""
    return [tuple(int(d) for d in dims.split(",") if d) for dims in
            re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", program.as_text())]


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
            decode = compiled(vae.module, vae.params, "decode", z.shape)
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
    out = subprocess.run([sys.executable, "-m", "flax_vae.testing", "worker", name, spec, *map(str, sizes)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"memory worker {name} {spec} {sizes} failed:\n{out.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def parse_tiling(text) -> Tiling:
    """"size:overlap:batch" -> Tiling."""
    size, overlap, batch = map(int, text.split(":"))
    return Tiling(size=size, overlap=overlap, batch=batch)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    w = sub.add_parser("worker")
    w.add_argument("name", choices=MODELS)
    w.add_argument("tiling", help="size:overlap:batch, or none")
    w.add_argument("sizes", type=int, nargs="+")
    args = p.parse_args()
    worker(args.name, args.sizes, None if args.tiling == "none" else parse_tiling(args.tiling))
