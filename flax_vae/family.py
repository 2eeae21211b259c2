"""The family contract: what a model file (taesd.py, kl.py, dcae.py) provides, and the list of families.

A new family (e.g. a video autoencoder) is one model file that satisfies `ModelFile` and one format module in
`flax_vae.convert` that satisfies `convert.FormatModule`, each added to its registry (`FAMILIES`,
`convert.FORMATS`). Nothing else in the library names a family.
"""
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from . import dcae, kl, taesd


class Config(Protocol):
    """A family's frozen config dataclass (hashable: jit compiles once per config)."""
    latent_channels: int  # C of the raw latents (N, H/f, W/f, C)
    scaling_factor: float
    shift_factor: float

    @property
    def family(self) -> str: ...  # the key in FAMILIES

    @property
    def factor(self) -> int: ...  # f: image pixels per latent along each side

    @property
    def has_posterior(self) -> bool: ...  # encoders that output a Gaussian (mean, logvar): KL


class Module(Protocol):
    """A family's Flax Linen module, NHWC. Images are (N, H, W, 3) in [-1, 1], H and W multiples of `factor`."""
    config: Config
    dtype: Any  # compute dtype

    def encode(self, images, key=None) -> jax.Array:
        """-> raw latents (N, H/f, W/f, C): the posterior mean, or a sample given a PRNG key (has_posterior)."""

    def posterior(self, images) -> tuple[jax.Array, jax.Array]:
        """-> (mean, logvar), each (N, H/f, W/f, C). Only where `config.has_posterior`."""

    def decode(self, latents) -> jax.Array:
        """Raw latents (N, h, w, C) -> images (N, h*f, w*f, 3) in about [-1, 1]."""

    def scale_latents(self, z) -> jax.Array:
        """Raw latents -> the diffusion model's latent space."""

    def unscale_latents(self, z) -> jax.Array:
        """The diffusion model's latent space -> raw latents."""

    def for_split_rows(self) -> "Module":
        """The same model for inputs whose rows are split over devices (`flax_vae.data_parallel(...,
        spatial_axis=)`): without loops over bands of rows, which would regather the rows, and need no bands
        there, each device holding 1/n of them."""


class ModelFile(Protocol):
    """What a model file defines at module level."""
    FAMILY: str
    PRESETS: dict[str, Config]  # released variants by name
    Config: type  # the config dataclass
    Module: type  # the Flax module class: Module(config, dtype=...)


FAMILIES: dict[str, ModelFile] = {m.FAMILY: m for m in (taesd, kl, dcae)}


def module(config: Config, dtype=jnp.float32) -> Module:
    """The family's Flax module for `config`, computing in `dtype`."""
    return FAMILIES[config.family].Module(config, dtype=dtype, parent=None)  # never a submodule of a caller


def init_params(config: Config, rng=None, resolution: int | None = None):
    """Random parameters of the right shapes (Flax's initialisers), for tests, distillation and shape checks.

    resolution: the side of the dummy image the module is initialised on (default: 2x2 latents, the fewest that
    FLUX.2's 2x2 latent patches take)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    side = resolution or 2 * config.factor
    return module(config).init(rng, jnp.zeros((1, side, side, 3)))["params"]


def param_shapes(config: Config) -> dict:
    """The parameter tree of `config` as jax.ShapeDtypeStructs, computed without running the initialisers."""
    return jax.eval_shape(lambda: init_params(config))
