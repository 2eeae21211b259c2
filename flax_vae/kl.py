"""AutoencoderKL: the Stable Diffusion / SDXL / SD3 / FLUX.1 / FLUX.2 VAEs as Flax Linen modules, NHWC.

    encoder: image [-1, 1] -> conv_in -> stages of (ResNet blocks, stride-2 conv) -> mid (ResNet, attention,
             ResNet) -> GroupNorm, SiLU, conv [-> 1x1 quant conv, where present] -> (mean, logvar)
    decoder: latents [-> 1x1 post-quant conv] -> conv_in -> mid -> stages of (ResNet blocks, nearest 2x, conv)
             -> GroupNorm, SiLU, conv -> image [-1, 1]

The mid-block attention is one head over all H*W/64 positions. It runs chunked, with an online softmax,
so its memory is O(chunk^2) instead of O(tokens^2) (see `attention`). At high resolution the decoder's last
stages run in bands of rows, exactly, so that only a ResNet block's input and output are held whole
(see `decode_in_bands`).

Latent conventions (`scale_latents`): raw latents -> diffusion latents is (z - shift) * scaling, or
(z - latents_mean) * scaling / latents_std where a config carries those; FLUX.2 first patchifies 2x2
(channel order c*4 + dy*2 + dx, as PyTorch's pixel_unshuffle) and normalises with the checkpoint's
BatchNorm running statistics.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import Conv3x3, DownsampleConv, UpsampleConv, pixel_shuffle, pixel_unshuffle, sample_gaussian
from .validation import check_fields

FAMILY = "kl"


@dataclasses.dataclass(frozen=True)
class KLConfig:
    """An AutoencoderKL variant (frozen, hashable; presets in `PRESETS`). Images (N, H, W, 3) in [-1, 1] <->
    raw latents (N, H/factor, W/factor, latent_channels); factor = 2 ** (len(block_out_channels) - 1). Every field
    is checked on construction."""
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
        check_fields(self)
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
    def has_posterior(self) -> bool:
        return True

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


def grouped(x, groups):
    """(N, H, W, C) -> (N, H, W, groups, C / groups), in float32 at least."""
    n, h, w, c = x.shape
    return x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(n, h, w, groups, c // groups)


def per_group(a):  # (N, groups) -> broadcastable against grouped(x)
    return a[:, None, None, :, None]


def group_moments(x, groups, inside=None):
    """(count, mean, M2) of x (N, H, W, C) per image and channel group, in float32 (M2: the sum of squared
    deviations from the mean). inside: an (H,) mask of the rows to count (a band's rows inside the image)."""
    x = grouped(x, groups)
    _, h, w, _, size = x.shape
    keep = (lambda a: a) if inside is None else (lambda a: jnp.where(inside[:, None, None, None], a, 0))
    count = (h if inside is None else inside.sum()) * w * size
    mean = keep(x).sum((1, 2, 4)) / count
    m2 = jnp.square(keep(x - per_group(mean))).sum((1, 2, 4))
    return jnp.asarray(count, jnp.float32), mean, m2


def merge_moments(a, b):
    """The moments of two disjoint sets of values from each's (Chan et al.'s update: no E[x^2] - E[x]^2
    cancellation, which loses float32's digits when the mean is large)."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), sa + sb + jnp.square(delta) * (na * nb / n)


class GroupNorm(nn.Module):
    """nn.GroupNorm as PyTorch computes it (two-pass variance in float32; the same "scale" and "bias" parameters).
    Given `moments` (`group_moments`, merged over the bands of an image) it normalises with those instead of x's own."""
    groups: int
    dtype: Any = jnp.float32
    epsilon: float = 1e-6  # diffusers' KL VAE (PyTorch's default is 1e-5)

    @nn.compact
    def __call__(self, x, moments=None):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        count, mean, m2 = group_moments(x, self.groups) if moments is None else moments
        y = (grouped(x, self.groups) - per_group(mean)) * per_group(jax.lax.rsqrt(m2 / count + self.epsilon))
        return (y.reshape(x.shape) * scale + bias).astype(self.dtype)


def norm_act_conv(norm, conv, x, moments=None, inside=None):
    """conv(silu(norm(x))). For a band of rows (`inside` marks those in the image): rows outside the image are
    zeroed after the activation, where PyTorch's zero padding sits, and the first and last output rows (which
    would need rows the band does not hold) are dropped."""
    h = nn.silu(norm(x, moments))
    if inside is None:
        return conv(h)
    return conv(jnp.where(inside[:, None, None], h, 0))[:, 1:-1]


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

    def setup(self):
        self.norm1 = GroupNorm(self.groups, self.dtype)
        self.conv1 = Conv3x3(self.features, dtype=self.dtype)
        self.norm2 = GroupNorm(self.groups, self.dtype)
        self.conv2 = Conv3x3(self.features, dtype=self.dtype)
        self.conv_shortcut = nn.Conv(self.features, (1, 1), dtype=self.dtype)  # used where the width changes

    def __call__(self, x):
        return self.residual(x, self.first_conv(x))

    # The two halves, also on a band of rows (`decode_in_bands`): the norm's input has a row more above and below
    # than the output (`inside` marks those inside the image); residual's x has the output's rows.
    def first_conv(self, x, moments=None, inside=None):
        return norm_act_conv(self.norm1, self.conv1, x, moments, inside)

    def residual(self, x, h, moments=None, inside=None):
        h = norm_act_conv(self.norm2, self.conv2, h, moments, inside)
        return (x if x.shape[-1] == self.features else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    groups: int
    chunk: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (N, h, w, C)
        n, hh, ww, c = x.shape
        h = GroupNorm(self.groups, self.dtype, name="group_norm")(x).reshape(n, hh * ww, c)  # (N, T, C)
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
        x = Conv3x3(widths[0], name="conv_in", dtype=dt)(x)  # (N, H, W, widths[0])
        for i, width in enumerate(widths):
            for j in range(c.layers_per_block):
                x = ResnetBlock(width, g, name=f"down_{i}_resnet_{j}", dtype=dt)(x)
            if i < len(widths) - 1:  # PyTorch pads (0, 1, 0, 1) by hand, then a stride-2 3x3 conv
                x = DownsampleConv(width, pad=0, name=f"down_{i}_downsample", dtype=dt)(x)  # half size
        x = MidBlock(widths[-1], g, c.mid_block_attention, self.attention_chunk, name="mid", dtype=dt)(x)
        conv_out = Conv3x3(2 * c.latent_channels, name="conv_out", dtype=dt)
        x = norm_act_conv(GroupNorm(g, dt, name="norm_out"), conv_out, x)  # (N, H/f, W/f, 2 * latent)
        if c.use_quant_conv:
            x = nn.Conv(2 * c.latent_channels, (1, 1), name="quant_conv", dtype=dt)(x)
        return x  # mean and logvar, concatenated on channels


class Decoder(nn.Module):
    config: KLConfig
    attention_chunk: int = 1024
    dtype: Any = jnp.float32
    band_above: int | None = 2**28  # see AutoencoderKL
    band_rows: int = 64

    @nn.compact
    def __call__(self, z):  # (N, h, w, latent)
        c, dt = self.config, self.dtype
        widths, g = c.decoder_widths[::-1], c.norm_num_groups  # widest (lowest resolution) first
        if c.use_post_quant_conv:
            z = nn.Conv(c.latent_channels, (1, 1), name="post_quant_conv", dtype=dt)(z)
        x = Conv3x3(widths[0], name="conv_in", dtype=dt)(z)  # (N, h, w, widths[0])
        x = MidBlock(widths[0], g, c.mid_block_attention, self.attention_chunk, name="mid", dtype=dt)(x)
        # stage i: nearest 2x + conv (i > 0; PyTorch counts it as the end of the stage before), then ResNet blocks
        stages = [(UpsampleConv(widths[i - 1], name=f"up_{i - 1}_upsample", dtype=dt) if i else None,
                   [ResnetBlock(width, g, name=f"up_{i}_resnet_{j}", dtype=dt) for j in range(c.layers_per_block + 1)])
                  for i, width in enumerate(widths)]
        norm_out, conv_out = GroupNorm(g, dt, name="norm_out"), Conv3x3(3, name="conv_out", dtype=dt)
        for i, (upsample, blocks) in enumerate(stages):
            if self.in_bands(x.shape, widths, i):
                return decode_in_bands(x, stages[i:], norm_out, conv_out, self.band_rows)
            x = upsample(x) if upsample else x
            for block in blocks:
                x = block(x)
        return norm_act_conv(norm_out, conv_out, x)  # (N, h*f, w*f, 3)

    def in_bands(self, shape, widths, i):
        """Whether stage i (and so every later one) runs in bands: its widest activation (block 0's input or
        output) is above band_above bytes per image. Parameters are created unbanded."""
        if self.band_above is None or self.is_initializing():
            return False
        _, h, w, _ = shape  # stage i's input, before its 2x upsampling
        channels = max(widths[max(i - 1, 0)], widths[i])
        return h * w * (4 if i else 1) * channels * jnp.dtype(self.dtype).itemsize > self.band_above


# ---- the decoder in bands of rows

PAD = 3  # rows held above and below a banded tensor's bands: the farthest a band's read reaches past them


def decode_in_bands(x, stages, norm_out, conv_out, band_rows: int):
    """The decoder's `stages` (and its output layers) on x, band of rows by band of rows: the unbanded result,
    holding only a ResNet block's input and output whole.

    Every stage is cut into the same number of bands, `band_rows` rows of the output image each (half as many at
    half its resolution: band_rows is rounded up to a multiple of the power of two). A 3x3 conv reads one row past its
    band on each side. GroupNorm needs statistics over the whole image, so a block takes two sweeps over the bands:
    the first computes conv1 and keeps only its GroupNorm moments (count, mean, M2, merged band by band), the second
    computes conv1 again with a row more on each side, then the rest of the block, writes the output's band and
    gathers the output's moments for the next block. An upsampling conv's output is never held: each band
    recomputes what it reads from the lower resolution (its moments take one more sweep).
    """
    levels = len(stages) - (stages[0][0] is None)  # halvings from the output's resolution down to x's
    band_rows = -(-band_rows // 2**levels) * 2**levels
    height = x.shape[1] * 2**levels
    bands, rows = -(-height // band_rows), band_rows // 2**levels  # rows: per band, at the current resolution
    source = Rows(jnp.pad(x, ((0, 0), (PAD, bands * rows - x.shape[1] + PAD), (0, 0), (0, 0))), x.shape[1],
                  group_moments(x, stages[0][1][0].groups) if stages[0][0] is None else None)
    for upsample, blocks in stages:
        if upsample is not None:
            source, rows = Upsampled(pure(upsample), source), 2 * rows
        for block in blocks:
            source = block_in_bands(block, source, rows, bands)
    norm, conv = pure(norm_out), pure(conv_out)
    image = sweep(lambda start: norm_act_conv(norm, conv, source.read(start - 1, rows + 2), source.moments,
                                              inside(start - 1, rows + 2, height)), bands, rows, height)
    return image.data[:, PAD:PAD + height]


def block_in_bands(block: ResnetBlock, source, rows: int, bands: int) -> "Rows":
    first_conv, residual = pure(block, "first_conv"), pure(block, "residual")
    height, groups = source.height, block.groups
    x_moments = source.moments
    if x_moments is None:  # an upsampling conv's output
        x_moments = sweep(lambda start: source.read(start, rows), bands, rows, height, groups, hold=False)

    def conv1(start, halo):  # x's rows start - halo - 1 .. start + rows + halo, and conv1's (one fewer each side)
        x = source.read(start - halo - 1, rows + 2 * halo + 2)
        return x, first_conv(x, x_moments, inside(start - halo - 1, rows + 2 * halo + 2, height))

    h_moments = sweep(lambda start: conv1(start, 0)[1], bands, rows, height, groups, hold=False)

    def output(start):
        x, h = conv1(start, 1)
        return residual(x[:, 2:-2], h, h_moments, inside(start - 1, rows + 2, height))

    return sweep(output, bands, rows, height, groups)


def sweep(band, bands: int, rows: int, height: int, groups: int | None = None, hold: bool = True):
    """Run band(start) -> (N, rows, W, C) for start = 0, rows, 2 * rows, ... (after the first band, in a loop).

    Returns the bands held in one tensor (`Rows`, with their GroupNorm moments given `groups`), or with hold=False
    the moments alone."""
    moments = lambda y, start: group_moments(y, groups, inside(start, rows, height)) if groups else None

    def step(b, carry):
        data, acc = carry
        y = band(b * rows)
        if hold:  # the loop carries the held tensor: XLA writes it in place
            data = jax.lax.dynamic_update_slice_in_dim(data, y, b * rows + PAD, axis=1)
        return data, None if acc is None else merge_moments(acc, moments(y, b * rows))

    # The held tensor is made from the first band: tensors of zeros, alike for every block, would be merged into one
    # by XLA and copied for every sweep at the start of the program, all held.
    first = band(0)
    data = jnp.pad(first, ((0, 0), (PAD, (bands - 1) * rows + PAD), (0, 0), (0, 0))) if hold else None
    data, acc = jax.lax.fori_loop(1, bands, step, (data, moments(first, 0)))
    return Rows(data, height, acc) if hold else acc


def inside(start, length, height):
    """Which of the rows start .. start + length - 1 lie inside an image of `height` rows."""
    rows = start + jnp.arange(length)
    return (rows >= 0) & (rows < height)


def pure(module: nn.Module, method: str = "__call__") -> Callable:
    """A bound submodule's method as a pure function of its inputs, parameters captured (callable in jax loops)."""
    return functools.partial(module.clone(parent=None).apply, {"params": module.variables["params"]}, method=method)


@dataclasses.dataclass(frozen=True)
class Rows:
    """An (N, height, W, C) tensor held with PAD rows above and enough below for every band's reads."""
    data: jax.Array
    height: int
    moments: Any = None  # its GroupNorm moments, where known

    def read(self, start, length):  # rows outside the image hold anything: readers mask them
        return jax.lax.dynamic_slice_in_dim(self.data, start + PAD, length, axis=1)


@dataclasses.dataclass(frozen=True)
class Upsampled:
    """upsample(rows) (nearest 2x + 3x3 conv) read band by band, never held whole."""
    upsample: Callable
    rows: Rows
    moments: Any = None  # not known before a sweep over it

    @property
    def height(self):
        return 2 * self.rows.height

    def read(self, start, length):
        low, count = start // 2 - 1, length // 2 + 3  # the low rows these come from, and one more on each side
        x = jnp.where(inside(low, count, self.rows.height)[:, None, None], self.rows.read(low, count), 0)
        return jax.lax.dynamic_slice_in_dim(self.upsample(x), start - 2 * low, length, axis=1)


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


class AutoencoderKL(nn.Module):
    """diffusers' convention at the boundary: images in [-1, 1]; raw latents (use scale_latents for diffusion)."""
    config: KLConfig
    dtype: Any = jnp.float32
    attention_chunk: int = 1024  # tokens per query/key chunk in the mid-block attention
    # Decoder stages whose widest activation is above band_above bytes per image (None: never), and all after
    # them, run in bands of band_rows output rows (`decode_in_bands`): the same result, holding only a block's
    # input and output whole, in a little more time. SD's VAE in float32: 512x512 unbanded (its widest activation
    # is 256 MiB), 1024x1024 in bands from the 512x512 stage on (figures: docs/benchmarks.md).
    band_above: int | None = 2**28
    band_rows: int = 64

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.attention_chunk, dtype=self.dtype)
        self.decoder = Decoder(c, self.attention_chunk, self.dtype, self.band_above, self.band_rows)
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
        return sample_gaussian(mean, logvar, jax.random.normal(key, mean.shape, mean.dtype))

    def decode(self, latents):
        """Raw latents (N, h, w, latent_channels) -> images (N, h*f, w*f, 3) in about [-1, 1] (not clamped)."""
        return self.decoder(latents.astype(self.dtype))

    def scale_latents(self, z):
        """Raw latents -> the diffusion model's latent space, as diffusers' pipelines do it."""
        c = self.config
        if c.latent_batch_norm:
            z = self.latent_norm.normalize(pixel_unshuffle(z))  # (N, h/2, w/2, 4 * latent)
        if c.latents_mean is not None:
            mean, std = jnp.asarray(c.latents_mean, z.dtype), jnp.asarray(c.latents_std, z.dtype)
            return (z - mean) * c.scaling_factor / std
        return (z - c.shift_factor) * c.scaling_factor

    def unscale_latents(self, z):
        """The diffusion model's latents -> raw latents, the inverse of `scale_latents`."""
        c = self.config
        if c.latents_mean is not None:
            mean, std = jnp.asarray(c.latents_mean, z.dtype), jnp.asarray(c.latents_std, z.dtype)
            z = z * std / c.scaling_factor + mean
        else:
            z = z / c.scaling_factor + c.shift_factor
        if c.latent_batch_norm:
            z = pixel_shuffle(self.latent_norm.denormalize(z))
        return z

    @nn.nowrap
    def for_split_rows(self):
        """This model for rows split over devices (the family contract, `flax_vae.family.Module`): unbanded."""
        return self.clone(band_above=None)

    def __call__(self, images):  # a round trip through the diffusion latent space (touches every parameter)
        return self.decode(self.unscale_latents(self.scale_latents(self.encode(images))))


# the family contract (flax_vae.family)
Config = KLConfig
Module = AutoencoderKL
