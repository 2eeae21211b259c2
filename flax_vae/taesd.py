"""TAESD: the tiny autoencoders (madebyollin/taesd) as Flax Linen modules, NHWC.

    encoder: image [0, 1] -> conv -> Block -> 3 x (stride-2 conv, depth x Block) -> conv -> latents
    decoder: latents -> tanh clamp -> conv -> 3 x (depth x Block, nearest 2x, conv) -> Block -> conv -> image

The 32x layout ("f32", taesana) adds two stride-2 convs to the encoder stem and two more
upsampling stages to the decoder, whose widths start at 4x and taper to 1x.
taef2 adds a GroupNorm branch ("pool") to the blocks at the lowest resolution.
TAESD latents are already diffusion-space latents: scaling_factor 1, shift_factor 0.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .layers import Conv3x3, DownsampleConv, UpsampleConv
from .validation import check_fields

FAMILY = "taesd"
# Latents live in about [-LATENT_MAGNITUDE, LATENT_MAGNITUDE]: the decoder soft-clamps them there (tanh), and
# madebyollin's 8-bit packing maps them to z / (2 * LATENT_MAGNITUDE) + LATENT_SHIFT in [0, 1].
LATENT_MAGNITUDE = 3
LATENT_SHIFT = 0.5


@dataclasses.dataclass(frozen=True)
class TAESDConfig:
    """A TAESD variant (frozen, hashable; presets in `PRESETS`). Images (N, H, W, 3) in [-1, 1] <-> latents
    (N, H/factor, W/factor, latent_channels), about [-3, 3]; every field is checked on construction."""
    latent_channels: int = 4
    factor: int = 8  # spatial down/up-sampling: 8 (classic) or 32 (taesana layout)
    width: int = 64
    depth: int = 3  # residual blocks per stage
    midblock_gn: bool = False  # taef2's GroupNorm branch in the lowest-resolution blocks
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        check_fields(self)
        if self.factor not in (8, 32):
            raise ValueError(f"TAESD factor must be 8 or 32, got {self.factor}")
        if self.width % 8 or self.width < 8:
            raise ValueError(f"TAESD width must be a positive multiple of 8, got {self.width}")

    @property
    def family(self) -> str:
        return FAMILY

    @property
    def has_posterior(self) -> bool:
        return False

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """Width of each decoder stage, the last being the full-resolution stage."""
        w = self.width
        return (w, w, w, w) if self.factor == 8 else (4 * w, 2 * w, w, w, w, w)


PRESETS = {
    "taesd": TAESDConfig(latent_channels=4),  # SD 1.x / 2.x
    "taesdxl": TAESDConfig(latent_channels=4),
    "taesd3": TAESDConfig(latent_channels=16),
    "taef1": TAESDConfig(latent_channels=16),
    "taef2": TAESDConfig(latent_channels=32, midblock_gn=True),  # FLUX.2
    "taesana": TAESDConfig(latent_channels=32, factor=32),  # SANA's DC-AE f32c32 latents
}


class Block(nn.Module):
    features: int
    midblock_gn: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if self.midblock_gn:
            # GroupNorm statistics span the whole image: the one non-local operation in TAESD.
            p = nn.Conv(4 * c, (1, 1), use_bias=False, name="pool_in", dtype=self.dtype)(x)
            p = nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False, name="pool_norm",
                             dtype=self.dtype)(p)
            x = x + nn.Conv(c, (1, 1), use_bias=False, name="pool_out", dtype=self.dtype)(nn.relu(p))
        h = nn.relu(Conv3x3(self.features, name="conv_0", dtype=self.dtype)(x))
        h = nn.relu(Conv3x3(self.features, name="conv_1", dtype=self.dtype)(h))
        h = Conv3x3(self.features, name="conv_2", dtype=self.dtype)(h)
        if c != self.features:
            x = nn.Conv(self.features, (1, 1), use_bias=False, name="skip", dtype=self.dtype)(x)
        return nn.relu(h + x)


class Encoder(nn.Module):
    config: TAESDConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (N, H, W, 3) in [0, 1]
        c, w, dt = self.config, self.config.width, self.dtype
        if c.factor == 32:
            x = nn.relu(DownsampleConv(w // 2, name="conv_in_0", dtype=dt)(x))  # (N, H/2, W/2, w/2)
            x = nn.relu(DownsampleConv(w, name="conv_in_1", dtype=dt)(x))  # (N, H/4, W/4, w)
        else:
            x = Conv3x3(w, name="conv_in", dtype=dt)(x)  # (N, H, W, w)
        x = Block(w, name="block_in", dtype=dt)(x)
        for s in range(3):
            x = DownsampleConv(w, use_bias=False, name=f"down_{s}", dtype=dt)(x)  # stride 2
            for b in range(c.depth):
                x = Block(w, midblock_gn=c.midblock_gn and s == 2, name=f"blocks_{s}_{b}", dtype=dt)(x)
        return Conv3x3(c.latent_channels, name="conv_out", dtype=dt)(x)  # (N, H/f, W/f, latent)


class Decoder(nn.Module):
    config: TAESDConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):  # (N, h, w, latent)
        c, dt = self.config, self.dtype
        widths = c.decoder_widths
        x = jnp.tanh(z / LATENT_MAGNITUDE) * LATENT_MAGNITUDE
        x = nn.relu(Conv3x3(widths[0], name="conv_in", dtype=dt)(x))  # (N, h, w, widths[0])
        for s in range(len(widths) - 1):
            for b in range(c.depth):
                x = Block(widths[s], midblock_gn=c.midblock_gn and s == 0, name=f"blocks_{s}_{b}", dtype=dt)(x)
            x = UpsampleConv(widths[s + 1], use_bias=False, name=f"up_{s}", dtype=dt)(x)  # nearest 2x, conv
        x = Block(widths[-1], name="block_out", dtype=dt)(x)
        return Conv3x3(3, name="conv_out", dtype=dt)(x)  # (N, H, W, 3) in about [0, 1]


class TAESD(nn.Module):
    """diffusers' convention at the boundary: images in [-1, 1]; raw latents (= diffusion latents)."""
    config: TAESDConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, dtype=self.dtype)
        self.decoder = Decoder(self.config, dtype=self.dtype)

    def encode(self, images):
        """(N, H, W, 3) in [-1, 1] -> latents (N, H/f, W/f, latent_channels), about [-3, 3]."""
        return self.encoder((images.astype(self.dtype) + 1) / 2)

    def decode(self, latents):
        """Latents (N, h, w, latent_channels) -> images (N, h*f, w*f, 3) in about [-1, 1] (not clamped)."""
        return self.decoder(latents.astype(self.dtype)) * 2 - 1

    def scale_latents(self, z):
        """Raw latents -> diffusion latents: (z - shift_factor) * scaling_factor (the identity for the presets)."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z):
        """Diffusion latents -> raw latents, the inverse of `scale_latents`."""
        return z / self.config.scaling_factor + self.config.shift_factor

    @nn.nowrap
    def for_split_rows(self):
        """This model for rows split over devices (the family contract, `flax_vae.family.Module`)."""
        return self  # no loops over rows

    def __call__(self, images):
        return self.decode(self.encode(images))


# the family contract (flax_vae.family)
Config = TAESDConfig
Module = TAESD
