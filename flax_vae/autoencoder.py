"""The public model object and the pure encode/decode functions.

Conventions, every family: images are NHWC (N, H, W, 3) floats in [-1, 1], H and W multiples of the model's
`factor`; raw latents are NHWC (N, H/f, W/f, C) in the model's own range (`scale_latents` maps them to the
diffusion model's latent space). `Autoencoder` checks its inputs; the pure `*_fn` functions do not, for use
inside your own jit, scan, vmap or grad.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import taesd, tiling
from .images import to_uint8


def encode_fn(module: nn.Module, params, images, key=None):
    """Pure: (N, H, W, 3) images in [-1, 1] -> raw latents (N, H/f, W/f, C). Safe inside jit/scan/vmap/grad.

    key: a PRNG key to sample the posterior instead of taking its mean (families with a posterior, e.g. KL)."""
    args = (images,) if key is None else (images, key)
    return module.apply({"params": params}, *args, method=module.encode)


def posterior_fn(module: nn.Module, params, images):
    """Pure: images -> the posterior's (mean, logvar), each (N, H/f, W/f, C) (families with a posterior)."""
    return module.apply({"params": params}, images, method=module.posterior)


def decode_fn(module: nn.Module, params, latents):
    """Pure: raw latents (N, h, w, C) -> (N, h*f, w*f, 3) images in about [-1, 1]."""
    return module.apply({"params": params}, latents, method=module.decode)


def decode_uint8_fn(module: nn.Module, params, latents):
    """Pure: raw latents (N, h, w, C) -> (images (N, h*f, w*f, 3) uint8, clamped and cast where they were
    decoded; finite (N,) bool, whether each image was free of NaN/inf before the cast). A quarter of the float32
    bytes to copy to the host."""
    images = decode_fn(module, params, latents)
    return to_uint8(images), jnp.isfinite(images).all(axis=(1, 2, 3))


def scale_latents_fn(module: nn.Module, params, z):
    """Pure: raw latents -> the diffusion model's latent space, by the family's convention."""
    return module.apply({"params": params}, z, method=module.scale_latents)


def unscale_latents_fn(module: nn.Module, params, z):
    """Pure: the diffusion model's latents -> raw latents (the inverse of `scale_latents_fn`)."""
    return module.apply({"params": params}, z, method=module.unscale_latents)


# One compilation per (module, input shape, input dtype): the module is static and hashable.
_encode = jax.jit(encode_fn, static_argnums=0)
_decode = jax.jit(decode_fn, static_argnums=0)
_decode_uint8 = jax.jit(decode_uint8_fn, static_argnums=0)
_posterior = jax.jit(posterior_fn, static_argnums=0)
_scale = jax.jit(scale_latents_fn, static_argnums=0)
_unscale = jax.jit(unscale_latents_fn, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    """A loaded autoencoder: its config, Flax module and parameters, with checked, compiled encode and decode.

    Made by `flax_vae.load`. Calls compile once per input shape and dtype. Inputs are checked (shape, channels,
    dtype, finite, images within [-1.5, 1.5]) and outputs are checked for NaN/inf (FloatingPointError); the pure
    functions (`encode_fn`, `decode_fn`, ...) skip both."""
    config: Any  # the family's frozen config dataclass
    module: nn.Module
    params: Any  # {"encoder": ..., "decoder": ...}; either may be absent
    name: str = "custom"

    @property
    def factor(self) -> int:
        """Image pixels per latent along each side (8 or 32)."""
        return self.config.factor

    @property
    def dtype(self):
        """The compute dtype."""
        return self.module.dtype

    def encode(self, images, key=None, tile=None):
        """(N, H, W, 3) in [-1, 1], H and W multiples of `factor` -> raw latents (N, H/f, W/f, C).

        For families with a posterior (KL): its mean, or a sample when given a PRNG `key`.
        tile: a `flax_vae.Tiling` (or a tile size in pixels) to encode tile by tile in bounded memory."""
        if tile is not None:
            if key is not None:
                raise ValueError("tiled encoding takes the posterior mean: give key= or tile=, not both")
            # the input is checked once here and the output once at the end, not per tile
            encode = functools.partial(_encode, self.module, self.params)
            return self._finite(tiling.tiled_encode(encode, self._images(images), as_tiling(tile), self.factor),
                                "encode")
        if key is not None:
            self._require_posterior()
        images = jnp.asarray(self._images(images))
        return self._finite(_encode(self.module, self.params, images, key=key), "encode", images)

    def posterior(self, images):
        """(N, H, W, 3) in [-1, 1] -> the posterior's (mean, logvar), each (N, H/f, W/f, C), logvar clipped to
        [-30, 20] (families with one, `config.has_posterior`: KL)."""
        self._require_posterior()
        images = jnp.asarray(self._images(images))
        return self._finite(_posterior(self.module, self.params, images), "encode", images)

    def decode(self, latents, tile=None):
        """Raw latents (N, h, w, C) -> images (N, h*f, w*f, 3) in about [-1, 1] (not clamped).

        tile: a `flax_vae.Tiling` (or a tile size in image pixels) to decode tile by tile in bounded memory."""
        latents = self._latents(latents)
        if tile is not None:
            decode = functools.partial(_decode, self.module, self.params)
            return self._finite(tiling.tiled_decode(decode, latents, as_tiling(tile), self.factor), "decode")
        latents = jnp.asarray(latents)
        return self._finite(_decode(self.module, self.params, latents), "decode", latents)

    def decode_uint8(self, latents, tile=None):
        """`decode`, clamped to [-1, 1] and cast to uint8 (N, h*f, w*f, 3) on the device: 4x less to copy to the
        host than float32 (what matters on TPUs). tile: as for `decode` (tiles are blended on the host)."""
        if tile is not None:
            return to_uint8(self.decode(latents, tile))
        latents = jnp.asarray(self._latents(latents))
        images, finite = _decode_uint8(self.module, self.params, latents)
        if not bool(finite.all()):
            self._nonfinite("decode", latents)
        return images

    def scale_latents(self, z):
        """Raw latents -> the diffusion model's latent space, as the family's pipelines do it
        (e.g. (z - shift_factor) * scaling_factor; FLUX.2 also patchifies and normalises)."""
        return _scale(self.module, self.params, z)

    def unscale_latents(self, z):
        """The diffusion model's latents -> raw latents, ready for `decode`."""
        return _unscale(self.module, self.params, z)

    def _images(self, images):
        self._require("encoder")
        images = _checked(images, "images", channels=3, image_range=True)
        n, h, w, _ = images.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"images: height and width must be multiples of {self.factor}, got {h}x{w}; "
                             f"crop or pad first (e.g. flax_vae.crop_to_multiple)")
        return images

    def _latents(self, latents):
        self._require("decoder")
        return _checked(latents, "latents", self.config.latent_channels)

    def _finite(self, out, what, inputs=None):
        """Never hand back NaN/inf silently: reduced precision overflows (the SDXL VAE in float16 does)."""
        if not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(out)):
            self._nonfinite(what, inputs)
        return out

    def _nonfinite(self, what, inputs=None):
        """Raise the FloatingPointError, naming the layer whose output first held NaN/inf when given the inputs."""
        layer = None if inputs is None else first_nonfinite_layer(self.module, self.params, what, inputs)
        where = f", first in the output of {layer}" if layer else ""
        fix = ("load it with dtype=jnp.bfloat16 or jnp.float32 instead, or use weights fine-tuned for float16 "
               "(for SDXL: madebyollin/sdxl-vae-fp16-fix)" if jnp.dtype(self.dtype) == jnp.float16 else
               "the inputs or weights are out of range for this model")
        raise FloatingPointError(f"{what}: {self!r} produced NaN or infinite values "
                                 f"({jnp.dtype(self.dtype).name} compute){where}; {fix}")

    def _require_posterior(self):
        if not self.config.has_posterior:
            raise ValueError(f"{self.config.family} encoders are deterministic: they have no posterior to return "
                             "or sample")

    def _require(self, part):
        if part not in self.params:
            raise ValueError(f"this {self.name} model was loaded without its {part}")

    def __repr__(self):
        parts = "+".join(p for p in ("encoder", "decoder") if p in self.params)
        return f"Autoencoder({self.config.family}:{self.name}, {parts}, dtype={jnp.dtype(self.dtype).name})"


def first_nonfinite_layer(module: nn.Module, params, what: str, inputs) -> str | None:
    """The path of the first layer (in the order layers finish) whose output holds NaN or inf in `what`
    ("encode" or "decode") on `inputs`, or None. Runs the model once more, unbanded (a loop over bands would hide
    its layers), keeping one flag per layer rather than the outputs."""
    module = module.for_split_rows()
    names = []

    def flags(params, inputs):
        finished = []

        def record(call, args, kwargs, context):
            out = call(*args, **kwargs)
            floats = [x for x in jax.tree.leaves(out) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
            if floats and context.module.path:
                names.append("/".join(context.module.path))
                finished.append(jnp.all(jnp.stack([jnp.isfinite(x).all() for x in floats])))
            return out
        with nn.intercept_methods(record):
            module.apply({"params": params}, inputs, method=getattr(module, what))
        return jnp.stack(finished)

    finite = np.asarray(jax.jit(flags)(params, inputs))
    return names[int(np.argmin(finite))] if not finite.all() else None


def as_tiling(tile) -> tiling.Tiling:
    """A Tiling, or a tile size in image pixels made into one."""
    return tile if isinstance(tile, tiling.Tiling) else tiling.Tiling(size=int(tile))


# Images are expected in [-1, 1]; values beyond this are clearly another convention (0-255 or a bad transform).
IMAGE_RANGE_LIMIT = 1.5


def _checked(x, what, channels, image_range=False):
    """x as an NHWC float batch with `channels` channels, finite and (image_range) within +-IMAGE_RANGE_LIMIT."""
    # numpy inputs are checked on the host and stay there (sharded later, or cut into tiles); plain calls pass
    # jnp.asarray(x), so that numpy and jax inputs share one compiled function
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{what}: expected a batch (N, H, W, {channels}) in NHWC, got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        hint = " (NCHW? transpose to NHWC)" if x.shape[1] == channels else ""
        raise ValueError(f"{what}: expected {channels} channels last, got shape {tuple(x.shape)}{hint}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        fix = "; for 0-255 pixels use x / 127.5 - 1" if image_range else ""
        raise ValueError(f"{what}: expected floats{' in [-1, 1]' if image_range else ''}, got {x.dtype}{fix}")
    finite, low, high = _summary(x)
    if not bool(finite):
        raise ValueError(f"{what}: contains NaN or infinite values")
    low, high = float(low), float(high)
    if image_range and (high > IMAGE_RANGE_LIMIT or low < -IMAGE_RANGE_LIMIT):
        raise ValueError(f"{what}: values span [{low:g}, {high:g}], but the model expects [-1, 1]: convert 0-255 "
                         "pixels with x / 127.5 - 1, and 0-1 values with x * 2 - 1 (the pure encode_fn skips "
                         "this check)")
    return x


def _summary(x):
    """(all finite, min, max) in one pass; jax arrays are reduced on their device."""
    if isinstance(x, np.ndarray):
        return np.isfinite(x).all(), x.min(initial=np.inf), x.max(initial=-np.inf)
    return _device_summary(x)


@jax.jit
def _device_summary(x):
    return jnp.isfinite(x).all(), x.min(initial=jnp.inf), x.max(initial=-jnp.inf)


def pack_uint8(latents):
    """TAESD's 8-bit packing of raw latents (what madebyollin stores as PNG): [-3, 3] -> uint8 [0, 255], clamped."""
    unit = latents / (2 * taesd.LATENT_MAGNITUDE) + taesd.LATENT_SHIFT
    return jnp.round(jnp.clip(unit, 0, 1) * 255).astype(jnp.uint8)


def unpack_uint8(packed):
    """The inverse of `pack_uint8` (to 1/255 of the range): uint8 -> float32 raw latents in [-3, 3]."""
    return (jnp.asarray(packed, jnp.float32) / 255 - taesd.LATENT_SHIFT) * (2 * taesd.LATENT_MAGNITUDE)


def crop_to_multiple(images, factor: int):
    """Crop (N, H, W, C) from the top-left to (N, H // factor * factor, W // factor * factor, C)."""
    h, w = images.shape[1] // factor * factor, images.shape[2] // factor * factor
    return images[:, :h, :w]
