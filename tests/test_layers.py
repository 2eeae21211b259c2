"""The shared convolutions of flax_vae/layers.py against PyTorch's, on the same weights (float32, 1e-5 relative:
each output sums at most 9 * C products, so float32 rounding stays near 1e-6)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_vae.layers import Conv3x3, DownsampleConv, UpsampleConv, _winograd_pays


def torch_conv(x, kernel, bias, stride=1, pad=(1, 1, 1, 1), upsample=False):
    t = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
    if upsample:
        t = torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")
    t = torch.nn.functional.pad(t, pad)
    w = torch.from_numpy(np.asarray(kernel)).permute(3, 2, 0, 1)
    out = torch.nn.functional.conv2d(t, w, torch.from_numpy(np.asarray(bias)), stride)
    return out.permute(0, 2, 3, 1).numpy()


def params_for(module, x, seed=0):
    params = module.init(jax.random.key(seed), x)
    return jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)  # non-zero biases


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("shape,features,winograd,uses_winograd", [
    ((2, 6, 8, 5), 7, True, True),  # Winograd forced on a small layer
    ((1, 16, 18, 256), 256, None, True),  # picked by the rule on CPU
    ((1, 5, 6, 3), 4, None, False),  # odd height: XLA's convolution
])
def test_conv3x3_matches_torch(shape, features, winograd, uses_winograd):
    assert (winograd if winograd is not None else _winograd_pays(shape, features)) == uses_winograd
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    module = Conv3x3(features, winograd=winograd)
    p = params_for(module, x)["params"]
    out = module.apply({"params": p}, x)
    assert rel(out, torch_conv(x, p["kernel"], p["bias"])) < 1e-5


def test_conv3x3_winograd_rule():
    assert _winograd_pays((1, 128, 128, 512), 512)  # where it is 1.7x faster
    assert not _winograd_pays((1, 512, 512, 128), 128)  # narrow: the transforms' traffic eats the gain
    assert not _winograd_pays((1, 256, 256, 512), 512)  # 128 MiB per image: 4x that in transformed tiles
    assert not _winograd_pays((1, 64, 63, 512), 512)  # odd width: no 2x2 tiles
    assert not _winograd_pays((1, 8, 8, 512), 512)  # too small: fixed costs


def test_conv3x3_winograd_gradients_match():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 4)), jnp.float32)
    p = params_for(Conv3x3(3), x)
    grad = lambda winograd: jax.grad(lambda p, x: jnp.sum(Conv3x3(3, winograd=winograd).apply(p, x) ** 2),
                                     argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(grad(True)), jax.tree.leaves(grad(False))):
        assert rel(a, np.asarray(b)) < 1e-5


@pytest.mark.parametrize("pad", [1, 0])  # PyTorch's padding=1; the SD VAE encoder's (0, 1) padding
def test_downsample_conv_matches_torch(pad):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 10, 5)), jnp.float32)
    module = DownsampleConv(6, pad=pad)
    p = params_for(module, x)["params"]
    expected = torch_conv(x, p["kernel"], p["bias"], stride=2, pad=(pad, 1, pad, 1))
    assert rel(module.apply({"params": p}, x), expected) < 1e-5
    with pytest.raises(ValueError, match="even height and width"):
        module.apply({"params": p}, x[:, :7])


def test_upsample_conv_matches_torch():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 7, 4)), jnp.float32)
    module = UpsampleConv(3)
    p = params_for(module, x)["params"]
    assert rel(module.apply({"params": p}, x), torch_conv(x, p["kernel"], p["bias"], upsample=True)) < 1e-5
