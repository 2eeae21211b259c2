"""AutoencoderKL: the Stable Diffusion / SDXL / SD3 / FLUX.1 / FLUX.2 VAEs as Flax Linen modules, NHWC.

    encoder: image [-1, 1] -> conv_in -> stages of (ResNet blocks, stride-2 conv) -> mid (ResNet, attention,
             ResNet) -> GroupNorm, SiLU, conv [-> 1x1 quant conv, where present] -> (mean, logvar)
    decoder: latents [-> 1x1 post-quant conv] -> conv_in -> mid -> stages of (ResNet blocks, nearest 2x, conv)
             -> GroupNorm, SiLU, conv -> image [-1, 1]

The mid-block attention is one head over all H*W/64 positions. It runs chunked, with an online softmax,
so its memory is O(chunk^2) instead of O(tokens^2) (see `attention`).

Latent conventions (`scale_latents`): raw latents -> diffusion latents is (z - shift) * scaling, or
(z - latents_mean) * scaling / latents_std where a config carries those; FLUX.2 first patchifies 2x2
(channel order c*4 + dy*2 + dx, as PyTorch's pixel_unshuffle) and normalises with the checkpoint's
BatchNorm running statistics.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import UpsampleConv

FAMILY = "kl"


@dataclasses.dataclass(frozen=True)
class KLConfig:
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: same as the encoder's
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    latent_batch_norm: bool = False  # FLUX.2: 2x2 patchify + BatchNorm running statistics in scale_latents
    batch_norm_eps: float = 1e-4

    def __post_init__(self):
        for name in ("block_out_channels", "decoder_block_out_channels", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:  # lists from JSON -> tuples, so configs stay hashable (jit keys on them)
                object.__setattr__(self, name, tuple(value))
        widths = self.block_out_channels + (self.decoder_block_out_channels or ())
        if any(w % self.norm_num_groups for w in widths):
            raise ValueError(f"every width must be a multiple of norm_num_groups={self.norm_num_groups}: {widths}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std go together")
        if self.latents_mean is not None and len(self.latents_mean) != self.latent_channels:
            raise ValueError(f"latents_mean has {len(self.latents_mean)} values for {self.latent_channels} channels")

    @property
    def family(self) -> str:
        return FAMILY

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels


PRESETS = {
    "sd15": KLConfig(),
    "sd2": KLConfig(),
    "sdxl": KLConfig(scaling_factor=0.13025),
    "sd3": KLConfig(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                    scaling_factor=1.5305, shift_factor=0.0609),
    "flux1": KLConfig(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                      scaling_factor=0.3611, shift_factor=0.1159),
    "flux2": KLConfig(latent_channels=32, scaling_factor=1.0, latent_batch_norm=True),
}


def conv3(features, stride=1, padding=((1, 1), (1, 1)), name=None, dtype=jnp.float32):
    return nn.Conv(features, (3, 3), strides=stride, padding=padding, name=name, dtype=dtype)


def group_norm(groups, name, dtype):
    # diffusers' KL VAE uses eps 1e-6; the two-pass variance matches PyTorch to ~1e-7.
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name, dtype=dtype)


def attention(q, k, v, chunk: int = 1024):
    """softmax(q k^T / sqrt(d)) v for (N, T, d) inputs, one head, exact in float32.

    Queries are processed `chunk` at a time (lax.map) and, for each query chunk, keys and values `chunk` at a
    time with a running max / sum (online softmax), so at most (N, chunk, chunk) logits exist at once:
    a 1024x1024 image (16,384 tokens) needs 4 MiB of logits per image instead of 1 GiB.
    """
    n, t, d = q.shape
    c = min(chunk, t)
    pad = -t % c  # pad the token axis to whole chunks; padded keys are masked out, padded queries dropped
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (q, k, v))
    chunks = lambda a: a.reshape(n, -1, c, d).swapaxes(0, 1)  # (chunks, N, c, d)
    keys, values = chunks(k), chunks(v)
    valid = (jnp.arange(t + pad) < t).reshape(-1, c)  # (chunks, c)
    scale = d ** -0.5

    def one_query_chunk(qc):  # (N, c, d)
        def step(carry, kv):
            m, l, acc = carry  # running max (N, c), sum of exp (N, c), weighted values (N, c, d)
            kc, vc, ok = kv
            s = jnp.einsum("nqd,nkd->nqk", qc, kc, preferred_element_type=jnp.float32) * scale
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum("nqk,nkd->nqd", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
            return (m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv), None

        init = (jnp.full((n, c), -jnp.inf, jnp.float32), jnp.zeros((n, c), jnp.float32),
                jnp.zeros((n, c, d), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(step, init, (keys, values, valid))
        return acc / l[..., None]

    out = jax.lax.map(one_query_chunk, chunks(q))  # (chunks, N, c, d)
    return out.swapaxes(0, 1).reshape(n, t + pad, d)[:, :t].astype(q.dtype)


class ResnetBlock(nn.Module):
    features: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(group_norm(self.groups, "norm1", self.dtype)(x))
        h = conv3(self.features, name="conv1", dtype=self.dtype)(h)
        h = nn.silu(group_norm(self.groups, "norm2", self.dtype)(h))
        h = conv3(self.features, name="conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), name="conv_shortcut", dtype=self.dtype)(x)
        return x + h


class AttentionBlock(nn.Module):
    groups: int
    chunk: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (N, h, w, C)
        n, hh, ww, c = x.shape
        h = group_norm(self.groups, "group_norm", self.dtype)(x).reshape(n, hh * ww, c)  # (N, T, C)
        q, k, v = (nn.Dense(c, name=name, dtype=self.dtype)(h) for name in ("to_q", "to_k", "to_v"))
        h = nn.Dense(c, name="to_out", dtype=self.dtype)(attention(q, k, v, self.chunk))
        return x + h.reshape(n, hh, ww, c)


class MidBlock(nn.Module):
    features: int
    groups: int
    add_attention: bool = True
    attention_chunk: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.features, self.groups, name="resnet_0", dtype=self.dtype)(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, self.attention_chunk, name="attention", dtype=self.dtype)(x)
        return ResnetBlock(self.features, self.groups, name="resnet_1", dtype=self.dtype)(x)


class Encoder(nn.Module):
    config: KLConfig
    attention_chunk: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (N, H, W, 3) in [-1, 1]
        c, dt = self.config, self.dtype
        widths, g = c.block_out_channels, c.norm_num_groups
        x = conv3(widths[0], name="conv_in", dtype=dt)(x)  # (N, H, W, widths[0])
        for i, width in enumerate(widths):
            for j in range(c.layers_per_block):
                x = ResnetBlock(width, g, name=f"down_{i}_resnet_{j}", dtype=dt)(x)
            if i < len(widths) - 1:  # PyTorch pads (0, 1, 0, 1) by hand, then a stride-2 3x3 conv
                x = conv3(width, 2, ((0, 1), (0, 1)), name=f"down_{i}_downsample", dtype=dt)(x)  # half size
        x = MidBlock(widths[-1], g, c.mid_block_attention, self.attention_chunk, name="mid", dtype=dt)(x)
        x = nn.silu(group_norm(g, "norm_out", dt)(x))
        x = conv3(2 * c.latent_channels, name="conv_out", dtype=dt)(x)  # (N, H/f, W/f, 2 * latent)
        if c.use_quant_conv:
            x = nn.Conv(2 * c.latent_channels, (1, 1), name="quant_conv", dtype=dt)(x)
        return x  # mean and logvar, concatenated on channels


class Decoder(nn.Module):
    config: KLConfig
    attention_chunk: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):  # (N, h, w, latent)
        c, dt = self.config, self.dtype
        widths, g = c.decoder_widths[::-1], c.norm_num_groups  # widest (lowest resolution) first
        if c.use_post_quant_conv:
            z = nn.Conv(c.latent_channels, (1, 1), name="post_quant_conv", dtype=dt)(z)
        x = conv3(widths[0], name="conv_in", dtype=dt)(z)  # (N, h, w, widths[0])
        x = MidBlock(widths[0], g, c.mid_block_attention, self.attention_chunk, name="mid", dtype=dt)(x)
        for i, width in enumerate(widths):
            for j in range(c.layers_per_block + 1):
                x = ResnetBlock(width, g, name=f"up_{i}_resnet_{j}", dtype=dt)(x)
            if i < len(widths) - 1:
                x = UpsampleConv(width, name=f"up_{i}_upsample", dtype=dt)(x)  # nearest 2x, conv
        x = nn.silu(group_norm(g, "norm_out", dt)(x))
        return conv3(3, name="conv_out", dtype=dt)(x)  # (N, h*f, w*f, 3)


class LatentBatchNorm(nn.Module):
    """FLUX.2's latent normalisation: BatchNorm running statistics over 2x2-patchified latents, no affine."""
    features: int
    eps: float

    def setup(self):
        self.mean = self.param("mean", nn.initializers.zeros, (self.features,))
        self.var = self.param("var", nn.initializers.ones, (self.features,))

    def _stats(self):
        # Running statistics, not trained by gradient: keep them out of any optimiser's reach.
        mean, var = jax.lax.stop_gradient(self.mean), jax.lax.stop_gradient(self.var)
        return mean, jnp.sqrt(var + self.eps)

    def normalize(self, z):
        mean, std = self._stats()
        return (z - mean.astype(z.dtype)) / std.astype(z.dtype)

    def denormalize(self, z):
        mean, std = self._stats()
        return z * std.astype(z.dtype) + mean.astype(z.dtype)


def patchify(z):  # (N, h, w, C) -> (N, h/2, w/2, 4C), channel c*4 + dy*2 + dx
    n, h, w, c = z.shape
    z = z.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(n, h // 2, w // 2, 4 * c)


def unpatchify(z):  # inverse of patchify
    n, h, w, c4 = z.shape
    z = z.reshape(n, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return z.reshape(n, 2 * h, 2 * w, c4 // 4)


class AutoencoderKL(nn.Module):
    """diffusers' convention at the boundary: images in [-1, 1]; raw latents (use scale_latents for diffusion)."""
    config: KLConfig
    dtype: Any = jnp.float32
    attention_chunk: int = 1024  # tokens per query/key chunk in the mid-block attention

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.attention_chunk, dtype=self.dtype)
        self.decoder = Decoder(c, self.attention_chunk, dtype=self.dtype)
        if c.latent_batch_norm:
            self.latent_norm = LatentBatchNorm(4 * c.latent_channels, c.batch_norm_eps)

    def posterior(self, images):
        """(N, H, W, 3) -> the diagonal Gaussian's (mean, logvar), each (N, H/f, W/f, latent)."""
        moments = self.encoder(images.astype(self.dtype))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images, key=None):
        """The posterior mean, or a sample from the posterior when given a PRNG key."""
        mean, logvar = self.posterior(images)
        if key is None:
            return mean
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def decode(self, latents):
        return self.decoder(latents.astype(self.dtype))

    def scale_latents(self, z):
        """Raw latents -> the diffusion model's latent space, as diffusers' pipelines do it."""
        c = self.config
        if c.latent_batch_norm:
            z = self.latent_norm.normalize(patchify(z))  # (N, h/2, w/2, 4 * latent)
        if c.latents_mean is not None:
            mean, std = jnp.asarray(c.latents_mean, z.dtype), jnp.asarray(c.latents_std, z.dtype)
            return (z - mean) * c.scaling_factor / std
        return (z - c.shift_factor) * c.scaling_factor

    def unscale_latents(self, z):
        c = self.config
        if c.latents_mean is not None:
            mean, std = jnp.asarray(c.latents_mean, z.dtype), jnp.asarray(c.latents_std, z.dtype)
            z = z * std / c.scaling_factor + mean
        else:
            z = z / c.scaling_factor + c.shift_factor
        if c.latent_batch_norm:
            z = unpatchify(self.latent_norm.denormalize(z))
        return z

    def __call__(self, images):  # a round trip through the diffusion latent space (touches every parameter)
        return self.decode(self.unscale_latents(self.scale_latents(self.encode(images))))


def init_params(config: KLConfig, rng=None, resolution: int = 64):
    """Random parameters of the right shapes (for tests and shape checks)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    x = jnp.zeros((1, resolution, resolution, 3))
    return AutoencoderKL(config).init(rng, x)["params"]
