"""A layer all three families share: nearest 2x upsampling followed by a 3x3 convolution."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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
    XLA's strided convolution is 1.5-1.9x slower on CPU). pad 1 is PyTorch's padding=1; pad 0 is the
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
