"""The public model object and the pure encode/decode functions."""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def encode_fn(module: nn.Module, params, images):
    """Pure: (N, H, W, 3) images in [-1, 1] -> raw latents (N, H/f, W/f, C). Safe inside jit/scan/vmap/grad."""
    return module.apply({"params": params}, images, method=module.encode)


def decode_fn(module: nn.Module, params, latents):
    """Pure: raw latents (N, h, w, C) -> (N, h*f, w*f, 3) images in about [-1, 1]."""
    return module.apply({"params": params}, latents, method=module.decode)


# One compilation per (module, input shape, input dtype): the module is static and hashable.
_encode = jax.jit(encode_fn, static_argnums=0)
_decode = jax.jit(decode_fn, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    config: Any  # the family's frozen config dataclass
    module: nn.Module
    params: Any  # {"encoder": ..., "decoder": ...}; either may be absent
    name: str = "custom"

    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def dtype(self):
        return self.module.dtype

    def encode(self, images):
        """(N, H, W, 3) in [-1, 1], H and W multiples of `factor` -> raw latents (N, H/f, W/f, C)."""
        self._require("encoder")
        images = _checked(images, "images", channels=3)
        n, h, w, _ = images.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"images: height and width must be multiples of {self.factor}, got {h}x{w}; "
                             f"crop or pad first (e.g. flax_vae.crop_to_multiple)")
        return _encode(self.module, self.params, images)

    def decode(self, latents):
        """Raw latents (N, h, w, C) -> images (N, h*f, w*f, 3) in about [-1, 1] (not clamped)."""
        self._require("decoder")
        return _decode(self.module, self.params, _checked(latents, "latents", self.config.latent_channels))

    def scale_latents(self, z):
        """Raw latents -> the diffusion model's latent space: (z - shift_factor) * scaling_factor."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z):
        return z / self.config.scaling_factor + self.config.shift_factor

    def _require(self, part):
        if part not in self.params:
            raise ValueError(f"this {self.name} model was loaded without its {part}")

    def __repr__(self):
        parts = "+".join(p for p in ("encoder", "decoder") if p in self.params)
        return f"Autoencoder({self.config.family}:{self.name}, {parts}, dtype={jnp.dtype(self.dtype).name})"


def _checked(x, what, channels):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{what}: expected a batch (N, H, W, {channels}) in NHWC, got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        hint = " (NCHW? transpose to NHWC)" if x.shape[1] == channels else ""
        raise ValueError(f"{what}: expected {channels} channels last, got shape {tuple(x.shape)}{hint}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what}: expected floats, got {x.dtype}")
    if not bool(jnp.isfinite(x).all()):
        raise ValueError(f"{what}: contains NaN or infinite values")
    return x


def pack_uint8(latents):
    """TAESD's 8-bit packing of raw latents: clip(z / 6 + 0.5, 0, 1) as uint8 (what madebyollin stores as PNG)."""
    return jnp.round(jnp.clip(latents / 6 + 0.5, 0, 1) * 255).astype(jnp.uint8)


def unpack_uint8(packed):
    return (jnp.asarray(packed, jnp.float32) / 255 - 0.5) * 6


def crop_to_multiple(images, factor: int):
    """Crop (N, H, W, C) from the top-left to the largest multiple of `factor`."""
    h, w = images.shape[1] // factor * factor, images.shape[2] // factor * factor
    return images[:, :h, :w]
