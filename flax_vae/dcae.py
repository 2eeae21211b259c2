"""DC-AE: the deep compression autoencoders (MIT HAN Lab, used by SANA) as Flax Linen modules, NHWC.

    encoder: image -> stem -> stages of (blocks, down block) -> conv + channel-averaging shortcut -> latents
    decoder: latents -> conv + channel-duplicating shortcut -> stages of (up block, blocks)
             -> RMSNorm -> ReLU (SiLU in lite) -> head -> image

Blocks are residual conv blocks (early, high-resolution stages) or EfficientViT blocks (late stages):
ReLU linear attention ("LiteMLA") followed by a GLU MBConv. Down/up blocks add a parameter-free
shortcut: space-to-channel (pixel-unshuffle) then a mean over channel groups, or channel duplication
then channel-to-space (pixel-shuffle). The sana variants aggregate q/k/v over a 5x5 neighbourhood
(multi-scale) and resample with strided convs / nearest upsampling; in/mix have an empty first stage,
resample with pixel-(un)shuffle, and BatchNorm (running statistics) in the early decoder stages. lite
has sana's encoder and a decoder of residual conv blocks only, upsampling by pixel-shuffle.
Images are in [-1, 1]; latents are raw (scale with scaling_factor for the diffusion model).
"""
import dataclasses
import typing
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import Conv3x3, DownsampleConv, UpsampleConv, pixel_shuffle, pixel_unshuffle
from .validation import check_fields

FAMILY = "dcae"
BLOCKS = ("res", "vit")  # residual conv block, EfficientViT block
NORMS = ("rms", "bn")
ACTS = {"silu": nn.silu, "relu": nn.relu}
DOWNSAMPLES = ("conv", "pixel_unshuffle")  # strided 3x3 conv (sana) / conv to 1/4 of the channels, pixel-unshuffle
UPSAMPLES = ("interpolate", "pixel_shuffle")  # nearest 2x then conv (sana) / conv to 4x the channels, pixel-shuffle
EPS_NORM = 1e-5
EPS_ATTN = 1e-15


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """A DC-AE variant (frozen, hashable; presets in `PRESETS`). Images (N, H, W, 3) in [-1, 1] <-> raw latents
    (N, H/factor, W/factor, latent_channels); factor = 2 ** (stages - 1). Every field is checked on construction."""
    latent_channels: int = 32
    encoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    encoder_blocks: tuple[str, ...] = ("res", "res", "res", "vit", "vit", "vit")
    encoder_scales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))  # multi-scale q/k/v kernels
    decoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    decoder_blocks: tuple[str, ...] = ("res", "res", "res", "vit", "vit", "vit")
    decoder_scales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_norms: tuple[str, ...] = ("rms",) * 6
    decoder_acts: tuple[str, ...] = ("silu",) * 6
    downsample: str = "conv"  # encoder resampling, one of DOWNSAMPLES
    upsample: str = "interpolate"  # decoder resampling, one of UPSAMPLES
    decoder_out_act: str = "relu"  # between the decoder's last RMSNorm and its last conv
    head_dim: int = 32
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        check_fields(self)
        # Lists (from JSON) -> tuples, so that configs stay hashable (jit keys on the module).
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (list, tuple)):
                object.__setattr__(self, f.name, tuple(tuple(e) if isinstance(e, list) else e for e in v))
        n = len(self.encoder_widths)
        per_stage = [f.name for f in dataclasses.fields(self) if typing.get_origin(f.type) is tuple]
        if n < 2 or any(len(getattr(self, name)) != n for name in per_stage):
            raise ValueError("DC-AE: every per-stage field needs the same number (>= 2) of stages: "
                             + ", ".join(f"{k}={getattr(self, k)}" for k in per_stage))
        for part in ("encoder", "decoder"):
            widths, depths = getattr(self, f"{part}_widths"), getattr(self, f"{part}_depths")
            if depths[-1] == 0 or any(d == 0 for d in depths[1:]):
                raise ValueError(f"DC-AE {part}: only the first stage may be empty, got depths {depths}")
            for b, w in zip(getattr(self, f"{part}_blocks"), widths):
                if b not in BLOCKS:
                    raise ValueError(f"DC-AE {part}: block type must be one of {BLOCKS}, got {b!r}")
                if b == "vit" and w % self.head_dim:
                    raise ValueError(f"DC-AE {part}: EfficientViT width {w} is not a multiple of the head "
                                     f"dimension {self.head_dim}")
        if any(x not in NORMS for x in self.decoder_norms) or any(a not in ACTS for a in self.decoder_acts):
            raise ValueError(f"DC-AE decoder: norms must be in {NORMS} and activations in {tuple(ACTS)}")
        if self.decoder_out_act not in ACTS:
            raise ValueError(f"DC-AE decoder: decoder_out_act must be one of {tuple(ACTS)}, "
                             f"got {self.decoder_out_act!r}")
        if self.downsample not in DOWNSAMPLES or self.upsample not in UPSAMPLES:
            raise ValueError(f"DC-AE: downsample must be one of {DOWNSAMPLES} and upsample one of {UPSAMPLES}, "
                             f"got {self.downsample!r} and {self.upsample!r}")
        if self.encoder_widths[-1] % self.latent_channels or self.decoder_widths[-1] % self.latent_channels:
            raise ValueError("DC-AE: the deepest width must be a multiple of latent_channels (the shortcuts "
                             "average or duplicate channel groups)")

    @property
    def family(self) -> str:
        return FAMILY

    @property
    def has_posterior(self) -> bool:
        return False

    @property
    def factor(self) -> int:
        return 2 ** (len(self.encoder_widths) - 1)


_SANA = DCAEConfig(scaling_factor=0.41407)
_IN_MIX_F32 = DCAEConfig(
    encoder_depths=(0, 4, 8, 2, 2, 2), decoder_depths=(0, 5, 10, 2, 2, 2),
    encoder_scales=((),) * 6, decoder_scales=((),) * 6,
    decoder_norms=("bn",) * 3 + ("rms",) * 3, decoder_acts=("relu",) * 3 + ("silu",) * 3,
    downsample="pixel_unshuffle", upsample="pixel_shuffle")
_IN_MIX_F64 = DCAEConfig(
    latent_channels=128,
    encoder_widths=(128, 256, 512, 512, 1024, 1024, 2048), decoder_widths=(128, 256, 512, 512, 1024, 1024, 2048),
    encoder_depths=(0, 4, 8, 2, 2, 2, 2), decoder_depths=(0, 5, 10, 2, 2, 2, 2),
    encoder_blocks=("res",) * 3 + ("vit",) * 4, decoder_blocks=("res",) * 3 + ("vit",) * 4,
    encoder_scales=((),) * 7, decoder_scales=((),) * 7,
    decoder_norms=("bn",) * 3 + ("rms",) * 4, decoder_acts=("relu",) * 3 + ("silu",) * 4,
    downsample="pixel_unshuffle", upsample="pixel_shuffle")
_IN_MIX_F128 = DCAEConfig(
    latent_channels=512,
    encoder_widths=(128, 256, 512, 512, 1024, 1024, 2048, 2048),
    decoder_widths=(128, 256, 512, 512, 1024, 1024, 2048, 2048),
    encoder_depths=(0, 4, 8, 2, 2, 2, 2, 2), decoder_depths=(0, 5, 10, 2, 2, 2, 2, 2),
    encoder_blocks=("res",) * 3 + ("vit",) * 5, decoder_blocks=("res",) * 3 + ("vit",) * 5,
    encoder_scales=((),) * 8, decoder_scales=((),) * 8,
    decoder_norms=("bn",) * 3 + ("rms",) * 5, decoder_acts=("relu",) * 3 + ("silu",) * 5,
    downsample="pixel_unshuffle", upsample="pixel_shuffle")

# sana's encoder; a decoder of residual blocks only, pixel-shuffle upsampling, SiLU before its last conv.
_LITE = dataclasses.replace(
    _SANA, decoder_depths=(0, 3, 5, 4, 4, 4), decoder_blocks=("res",) * 6, decoder_scales=((),) * 6,
    upsample="pixel_shuffle", decoder_out_act="silu")

PRESETS = {
    "dc-ae-f32c32-sana-1.0": _SANA,
    "dc-ae-f32c32-sana-1.1": _SANA,  # retrained weights, same architecture and scaling factor
    "dc-ae-lite-f32c32-sana-1.1": _LITE,
    "dc-ae-f32c32-in-1.0": dataclasses.replace(_IN_MIX_F32, scaling_factor=0.3189),
    "dc-ae-f32c32-mix-1.0": dataclasses.replace(_IN_MIX_F32, scaling_factor=0.4552),
    "dc-ae-f64c128-in-1.0": dataclasses.replace(_IN_MIX_F64, scaling_factor=0.2889),
    "dc-ae-f64c128-mix-1.0": dataclasses.replace(_IN_MIX_F64, scaling_factor=0.4538),
    "dc-ae-f128c512-in-1.0": dataclasses.replace(_IN_MIX_F128, scaling_factor=0.4883),
    "dc-ae-f128c512-mix-1.0": dataclasses.replace(_IN_MIX_F128, scaling_factor=0.3620),
}


def conv(features, kernel=3, groups=1, use_bias=True, name=None, dtype=jnp.float32):
    if kernel == 3 and groups == 1:
        return Conv3x3(features, use_bias=use_bias, name=name, dtype=dtype)
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((p, p), (p, p)), feature_group_count=groups,
                   use_bias=use_bias, name=name, dtype=dtype)


class DepthwiseConv(nn.Module):
    """kxk conv of each channel on its own (stride 1, zero padding k//2); the parameters of a grouped
    nn.Conv (kernel (k, k, 1, C)). Written as k*k shifted multiply-adds, which XLA fuses into one pass: its
    grouped convolution with thousands of groups is slower on CPU. The k row shifts are taken once, whole (with
    rows split over devices, each is one exchange of k//2 rows with the neighbours), and the k column shifts of
    each are slices."""
    kernel_size: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, (_, h, w, c) = self.kernel_size, x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c)).astype(self.dtype)
        p = jnp.pad(x.astype(self.dtype), ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
        rows = [p[:, i:i + h] for i in range(k)]  # row tap i reads row y + i - k//2
        y = sum(rows[i][:, :, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (c,)).astype(self.dtype)
        return y


def channel_mean(x, groups):  # mean over runs of consecutive channels: (..., groups * g) -> (..., groups)
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups).mean(-1)


class RMSNorm(nn.Module):
    """RMS over channels with weight AND bias (unlike Flax's), statistics in float32."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS_NORM)
        return (y * scale + bias).astype(self.dtype)


class BatchNorm(nn.Module):
    """Inference BatchNorm. The running statistics are stored as parameters (mean, var) so that the
    model stays one parameter tree: they are constants here, never updated."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        y = (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var.astype(jnp.float32) + EPS_NORM) * scale) + bias
        return y.astype(self.dtype)


def norm(kind, name, dtype):
    return (RMSNorm if kind == "rms" else BatchNorm)(name=name, dtype=dtype)


class ResBlock(nn.Module):
    norm: str = "rms"
    act: str = "silu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = ACTS[self.act](conv(c, name="conv1", dtype=self.dtype)(x))
        h = conv(c, use_bias=False, name="conv2", dtype=self.dtype)(h)
        return x + norm(self.norm, "norm", self.dtype)(h)


class LiteMLA(nn.Module):
    """ReLU linear attention: out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), per head, global.

    The fused 1x1 qkv projection (plus its multi-scale aggregates) is cut into heads of 3*head_dim
    channels, each holding that head's q, k and v. The attention itself runs in float32 whatever the
    compute dtype (as the reference does): k^T v and the normaliser sum_m k_m are float32 accumulations over
    all H*W positions, which bf16 cannot hold, and eps 1e-15 only exists in float32.
    """
    scales: tuple[int, ...] = ()
    norm: str = "rms"
    head_dim: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        d, heads = self.head_dim, c // self.head_dim
        width = 3 * heads * d
        qkv = nn.Dense(width, use_bias=False, name="qkv", dtype=self.dtype)(x)  # (N, H, W, 3*inner)
        branches = [qkv]
        for i, k in enumerate(self.scales):  # depthwise kxk, then grouped 1x1 (one group per q/k/v of a head)
            a = DepthwiseConv(k, use_bias=False, name=f"aggreg_{i}_dw", dtype=self.dtype)(qkv)
            branches.append(conv(width, 1, groups=3 * heads, use_bias=False, name=f"aggreg_{i}_pw", dtype=self.dtype)(a))
        t = jnp.concatenate(branches, axis=-1).astype(jnp.float32).reshape(n, h * w, -1, 3 * d)  # (N, HW, heads', 3d)
        q, k, v = nn.relu(t[..., :d]), nn.relu(t[..., d:2 * d]), t[..., 2 * d:]
        if h * w > d:  # linear form: O(HW d^2)
            kv = jnp.einsum("bmhe,bmhd->bhed", k, v)  # (N, heads', d_k, d_v)
            num = jnp.einsum("bnhe,bhed->bnhd", q, kv)
            den = jnp.einsum("bnhe,bhe->bnh", q, k.sum(axis=1))[..., None]
        else:  # quadratic form, cheaper when HW <= d: the same quantity through the (HW x HW) scores
            scores = jnp.einsum("bmhe,bnhe->bhmn", k, q)  # (N, heads', keys, queries)
            num = jnp.einsum("bhmn,bmhd->bnhd", scores, v)
            den = scores.sum(axis=2).transpose(0, 2, 1)[..., None]
        out = (num / (den + EPS_ATTN)).astype(self.dtype).reshape(n, h, w, -1)
        out = nn.Dense(c, use_bias=False, name="proj", dtype=self.dtype)(out)
        return x + norm(self.norm, "norm", self.dtype)(out)


class GLUMBConv(nn.Module):
    """Inverted 1x1 (4x wider, doubled for the gate) -> SiLU -> depthwise 3x3 -> GLU -> 1x1 -> RMSNorm, residual."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, dt = x.shape[-1], self.dtype
        h = nn.silu(conv(8 * c, 1, name="inverted", dtype=dt)(x))
        h = DepthwiseConv(3, name="depth", dtype=dt)(h)
        h, gate = jnp.split(h, 2, axis=-1)
        h = conv(c, 1, use_bias=False, name="point", dtype=dt)(h * nn.silu(gate))
        return x + RMSNorm(name="norm", dtype=dt)(h)


class EfficientViTBlock(nn.Module):
    scales: tuple[int, ...] = ()
    norm: str = "rms"
    head_dim: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = LiteMLA(self.scales, self.norm, self.head_dim, name="attn", dtype=self.dtype)(x)  # global context
        return GLUMBConv(name="ffn", dtype=self.dtype)(x)  # local mixing


class DownBlock(nn.Module):
    """2x down: conv (strided, or to out/4 channels then pixel-unshuffle) + pixel-unshuffle/group-mean shortcut."""
    features: int
    pixel_shuffle: bool
    shortcut: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.pixel_shuffle:
            y = pixel_unshuffle(conv(self.features // 4, name="conv", dtype=self.dtype)(x))
        else:
            y = DownsampleConv(self.features, name="conv", dtype=self.dtype)(x)  # stride 2
        if self.shortcut:
            y = y + channel_mean(pixel_unshuffle(x), self.features)
        return y  # (N, H/2, W/2, features)


class UpBlock(nn.Module):
    """2x up: conv (to 4x channels then pixel-shuffle, or after nearest 2x) + channel-repeat/pixel-shuffle shortcut."""
    features: int
    pixel_shuffle: bool
    shortcut: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.pixel_shuffle:
            y = pixel_shuffle(conv(4 * self.features, name="conv", dtype=self.dtype)(x))
        else:
            y = UpsampleConv(self.features, name="conv", dtype=self.dtype)(x)  # nearest 2x, conv
        if self.shortcut:  # each channel repeated in place (repeat, not tile), then moved to space
            y = y + pixel_shuffle(jnp.repeat(x, 4 * self.features // x.shape[-1], axis=-1))
        return y  # (N, 2H, 2W, features)


def block(kind, scales, norm_kind, act, head_dim, name, dtype):
    if kind == "res":
        return ResBlock(norm_kind, act, name=name, dtype=dtype)
    return EfficientViTBlock(scales, norm_kind, head_dim, name=name, dtype=dtype)


class Encoder(nn.Module):
    config: DCAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (N, H, W, 3) in [-1, 1]
        c, dt = self.config, self.dtype
        widths, depths, unshuffle = c.encoder_widths, c.encoder_depths, c.downsample == "pixel_unshuffle"
        if depths[0]:
            x = conv(widths[0], name="conv_in", dtype=dt)(x)  # (N, H, W, w0)
        else:  # empty first stage: the stem already halves the resolution
            x = DownBlock(widths[1], unshuffle, shortcut=False, name="conv_in", dtype=dt)(x)
        for i, (width, depth) in enumerate(zip(widths, depths)):
            for j in range(depth):
                x = block(c.encoder_blocks[i], c.encoder_scales[i], "rms", "silu", c.head_dim,
                          f"stage{i}_block{j}", dt)(x)
            if depth and i < len(widths) - 1:
                x = DownBlock(widths[i + 1], unshuffle, name=f"stage{i}_down", dtype=dt)(x)  # (N, H/2^(i+1), ..)
        z = conv(c.latent_channels, name="conv_out", dtype=dt)(x)
        return z + channel_mean(x, c.latent_channels)  # (N, H/f, W/f, latent)


class Decoder(nn.Module):
    config: DCAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):  # (N, h, w, latent)
        c, dt = self.config, self.dtype
        widths, depths, shuffle = c.decoder_widths, c.decoder_depths, c.upsample == "pixel_shuffle"
        x = conv(widths[-1], name="conv_in", dtype=dt)(z) + jnp.repeat(z, widths[-1] // z.shape[-1], axis=-1)
        for i in reversed(range(len(widths))):
            if depths[i] and i < len(widths) - 1:
                x = UpBlock(widths[i], shuffle, name=f"stage{i}_up", dtype=dt)(x)  # 2x larger
            for j in range(depths[i]):
                x = block(c.decoder_blocks[i], c.decoder_scales[i], c.decoder_norms[i], c.decoder_acts[i],
                          c.head_dim, f"stage{i}_block{j}", dt)(x)
        x = ACTS[c.decoder_out_act](RMSNorm(name="norm_out", dtype=dt)(x))
        if depths[0]:
            return conv(3, name="conv_out", dtype=dt)(x)  # (N, H, W, 3)
        return UpBlock(3, shuffle, shortcut=False, name="conv_out", dtype=dt)(x)  # (N, H, W, 3)


class DCAE(nn.Module):
    """Images in [-1, 1] <-> raw latents."""
    config: DCAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, dtype=self.dtype)
        self.decoder = Decoder(self.config, dtype=self.dtype)

    def encode(self, images):
        """(N, H, W, 3) in [-1, 1] -> raw latents (N, H/f, W/f, latent_channels)."""
        return self.encoder(images.astype(self.dtype))

    def decode(self, latents):
        """Raw latents (N, h, w, latent_channels) -> images (N, h*f, w*f, 3) in about [-1, 1] (not clamped)."""
        return self.decoder(latents.astype(self.dtype))

    def scale_latents(self, z):
        """Raw latents -> diffusion latents: (z - shift_factor) * scaling_factor."""
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
Config = DCAEConfig
Module = DCAE
