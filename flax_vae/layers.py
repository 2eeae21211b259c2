"""The convolutions all three families share: 3x3, nearest 2x upsampling + 3x3, and stride-2 3x3."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Conv3x3(nn.Module):
    """nn.Conv(features, (3, 3), padding 1), with the same parameters; wide layers on CPU use Winograd.

    Winograd's F(2x2, 3x3) computes each 2x2 output tile from the 4x4 input tile around it: both transformed by
    small fixed matrices (additions only for the input, halves for the kernel), multiplied channel-wise as 16
    (tiles, C) x (C, F) matrix products, transformed back. That is 16/36 of the multiply-adds, with the error of
    a direct convolution (about 1e-6 relative to a float64 one, like XLA's). Below 16x16 its fixed costs lose,
    and narrow layers are bound by the transforms' memory traffic; the transformed input and products take 4x the
    input's and output's memory. So `winograd=None` picks it where it pays: CPU, both widths >= 256, at least
    16x16 and at most 64 MiB of input per image, even height and width. GPUs keep cuDNN. Per-layer timings:
    docs/benchmarks.md.
    """
    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    winograd: bool | None = None

    @nn.compact
    def __call__(self, x):  # (N, H, W, C)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        x = x.astype(self.dtype)
        if self.winograd if self.winograd is not None else _winograd_pays(x.shape, self.features):
            y = _winograd(x, kernel, self.dtype)
        else:
            y = jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y  # (N, H, W, F)


def _winograd_pays(shape, features):
    _, h, w, c = shape
    return (jax.default_backend() == "cpu" and min(c, features) >= 256 and 16 * 16 <= h * w
            and h * w * c * 4 <= 2 ** 26 and h % 2 == 0 and w % 2 == 0)


def _kernel_transform(g0, g1, g2):  # G g, G = [[1,0,0], [1/2,1/2,1/2], [1/2,-1/2,1/2], [0,0,1]]
    return g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2


def _input_transform(d0, d1, d2, d3):  # B^T d, B^T = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]]
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _output_transform(m0, m1, m2, m3):  # A^T m, A^T = [[1,1,1,0], [0,1,-1,-1]]
    return m0 + m1 + m2, m1 - m2 - m3


def _winograd(x, kernel, dtype):
    n, h, w, c = x.shape
    th, tw = h // 2, w // 2  # output tiles
    k = kernel.astype(jnp.float32)  # written out, not an einsum: XLA's CPU dot over 3 taps is slow
    u = jnp.stack([jnp.stack(_kernel_transform(*r)) for r in _kernel_transform(*k)]).astype(dtype)  # (4, 4, C, F)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(n, h + 2, tw + 1, 2, c)
    # tile (i, j) reads padded rows 2i..2i+3 and columns 2j..2j+3: tap b of a column is phase b % 2 of pair j + b // 2
    cols = jnp.stack(_input_transform(*(xp[:, :, b // 2:b // 2 + tw, b % 2] for b in range(4))))  # (4, N, H+2, tw, C)
    cols = cols.reshape(4, n, th + 1, 2, tw, c)
    v = jnp.stack(_input_transform(*(cols[:, :, a // 2:a // 2 + th, a % 2] for a in range(4))))  # (4, 4, N, th, tw, C)
    m = jnp.einsum("stc,scf->stf", v.reshape(16, n * th * tw, c), u.reshape(16, c, -1))
    m = m.reshape(4, 4, n, th, tw, -1)  # (row tap, column tap, N, th, tw, F)
    rows = _output_transform(*m)  # 2 x (4, N, th, tw, F)
    y = jnp.stack([jnp.stack(_output_transform(*r), axis=3) for r in rows], axis=2)  # (N, th, 2, tw, 2, F)
    return y.reshape(n, h, w, -1)


class UpsampleConv(nn.Module):
    """conv3x3(nearest_2x(x)) with padding 1, computed at the input's resolution.

    Output pixel (2i + a, 2j + b) reads input rows i-1..i (a = 0) or i..i+1 (a = 1), and likewise for
    columns: each of the four output phases is a 2x2 convolution of the input with the 3x3 kernel's taps
    summed where they land on the same input pixel. The parameters are nn.Conv(features, (3, 3))'s; it takes
    16/36 of the multiply-adds and never materialises the 4x larger upsampled input.
    """
    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (N, h, w, C)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        x = x.astype(self.dtype)
        rows = []
        for a in (0, 1):
            k = _fold(kernel, 0, a)
            phases = [jax.lax.conv_general_dilated(x, _fold(k, 1, b).astype(self.dtype), (1, 1),
                                                   (_PAD[a], _PAD[b]), dimension_numbers=("NHWC", "HWIO", "NHWC"))
                      for b in (0, 1)]
            rows.append(jnp.stack(phases, axis=3))  # (N, h, w, 2, F)
        y = jnp.stack(rows, axis=2)  # (N, h, 2, w, 2, F)
        n, h, _, w, _, f = y.shape
        y = y.reshape(n, 2 * h, 2 * w, f)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (f,)).astype(self.dtype)
        return y  # (N, 2h, 2w, F)


_PAD = ((1, 0), (0, 1))  # phase 0 reads the previous and the same input pixel, phase 1 the same and the next


def _fold(kernel, axis, phase):
    """The 3 taps along `axis` -> the 2 that output phase `phase` sees (taps landing on one input pixel summed)."""
    k = jnp.moveaxis(kernel, axis, 0)
    k = jnp.stack([k[0], k[1] + k[2]]) if phase == 0 else jnp.stack([k[0] + k[1], k[2]])
    return jnp.moveaxis(k, 0, axis)


class DownsampleConv(nn.Module):
    """A stride-2 3x3 convolution, padded (pad, 1) rows and columns, computed as stride-1 convolutions.

    With input x split into its four phases x[r::2, c::2], output pixel (i, j) reads kernel tap a from input
    row 2i + a - pad: the taps split by the parity of that row into a 1- or 2-tap kernel per phase, so the
    result is the sum of four small stride-1 convolutions at the output's resolution (the same multiply-adds;
    XLA's strided convolution is slower on CPU). pad 1 is PyTorch's padding=1; pad 0 is the
    (0, 1) padding of the Stable Diffusion VAE's encoder. Parameters: nn.Conv(features, (3, 3))'s.
    """
    features: int
    pad: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (N, H, W, C), H and W even
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"DownsampleConv needs even height and width, got {x.shape[1:3]}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = 0
        for r in (0, 1):
            rows, row_pad = _phase_taps(self.pad, r)
            for c in (0, 1):
                cols, col_pad = _phase_taps(self.pad, c)
                y = y + jax.lax.conv_general_dilated(x[:, r::2, c::2], kernel[rows][:, cols], (1, 1),
                                                     (row_pad, col_pad), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y  # (N, H/2, W/2, F)


def _phase_taps(pad, phase):
    """The kernel taps that land on input rows of this parity (a slice), and the padding of that phase's convolution.

    Tap a reads row 2i + a - pad = 2(i + d) + phase, d = (a - pad - phase) / 2 in {-1, 0, 1}."""
    first = (pad + phase) % 2
    offsets = [(a - pad - phase) // 2 for a in range(first, 3, 2)]
    return slice(first, 3, 2), (max(0, -offsets[0]), max(0, offsets[-1]))


def pixel_unshuffle(x):  # (N, H, W, C) -> (N, H/2, W/2, 4C), channel c*4 + dy*2 + dx as PyTorch's
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(n, h // 2, w // 2, 4 * c)


def pixel_shuffle(x):  # (N, h, w, 4C) -> (N, 2h, 2w, C), the inverse of pixel_unshuffle
    n, h, w, c4 = x.shape
    x = x.reshape(n, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(n, 2 * h, 2 * w, c4 // 4)


def sample_gaussian(mean, logvar, noise):
    """A sample of the diagonal Gaussian (mean, logvar) from standard normal `noise` of the same shape."""
    return mean + jnp.exp(0.5 * logvar) * noise
