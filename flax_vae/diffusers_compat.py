"""`FlaxAutoencoderKL`: diffusers 0.39's Flax VAE interface, computed by flax-vae's AutoencoderKL.

Code written for `diffusers.FlaxAutoencoderKL` runs with only its import changed: the same constructor fields,
`from_pretrained` -> (module, params), `init_weights`, `save_pretrained`, `apply(..., method=module.encode)` with
NCHW images and NHWC latents, the same output objects and the same params tree (so optimiser states and user
checkpoints built against the old class keep working). The params are restructured into flax-vae's tree inside
each call: a rearrangement of the same arrays, which costs nothing under jit.
"""
import warnings
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from . import convert, family
from .errors import CheckpointError
from .kl import AutoencoderKL, KLConfig
from .layers import sample_gaussian
from .loading import resolve

FIELDS = convert.diffusers_flax.FIELDS


class FrozenConfig(dict):
    """diffusers' config object: a read-only dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key, value):
        raise TypeError("the config of a FlaxAutoencoderKL is read-only")


@flax.struct.dataclass
class DiagonalGaussian:
    """diffusers' FlaxDiagonalGaussianDistribution, as a pytree (so jit can return it): NHWC (N, h, w, C)."""
    mean: jax.Array
    logvar: jax.Array  # clipped to [-30, 20]

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, key):
        """mean + std * N(0, 1) noise drawn with `key` (float32 noise, as diffusers draws it)."""
        return sample_gaussian(self.mean, self.logvar, jax.random.normal(key, self.mean.shape))

    def mode(self):
        return self.mean

    def kl(self, other=None):
        """KL divergence to N(0, 1), or to `other`, summed over (h, w, C): (N,)."""
        if other is None:
            return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=[1, 2, 3])
        return 0.5 * jnp.sum(jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
                             - self.logvar + other.logvar, axis=[1, 2, 3])

    def nll(self, sample, axis=(1, 2, 3)):
        """Negative log-likelihood of `sample`, summed over `axis`."""
        return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(sample - self.mean) / self.var,
                             axis=axis)


@flax.struct.dataclass
class FlaxAutoencoderKLOutput:
    latent_dist: DiagonalGaussian


@flax.struct.dataclass
class FlaxDecoderOutput:
    sample: jax.Array  # (N, 3, H, W)


class FlaxAutoencoderKL(nn.Module):
    """diffusers 0.39's `FlaxAutoencoderKL`: an SD-style KL VAE (quant convs, DownEncoderBlock2D /
    UpDecoderBlock2D, SiLU, RGB). Images NCHW in [-1, 1]; latents NHWC (decode also takes NCHW, told apart by the
    channel count as diffusers does). `dtype` is the compute dtype."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    dtype: Any = jnp.float32

    @property
    def config(self) -> FrozenConfig:
        """The constructor's fields, by diffusers' names (dict and attribute access)."""
        return FrozenConfig({name: getattr(self, name) for name in FIELDS})

    @property
    def kl_config(self) -> KLConfig:
        """The same model as flax-vae's KLConfig."""
        n = len(self.block_out_channels)
        if (self.in_channels, self.out_channels, self.act_fn) != (3, 3, "silu") or \
                tuple(self.down_block_types) != ("DownEncoderBlock2D",) * n or \
                tuple(self.up_block_types) != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"FlaxAutoencoderKL: only RGB, silu, DownEncoderBlock2D/UpDecoderBlock2D VAEs, got "
                             f"{dict(self.config)}")
        return KLConfig(latent_channels=self.latent_channels, block_out_channels=tuple(self.block_out_channels),
                        layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                        scaling_factor=float(self.scaling_factor))

    def setup(self):
        # The params, declared by their top-level names so that Module.init (nnx.bridge, lazy_init) makes them too:
        # one tree from flax-vae's initialisers, drawn with the first name's key. apply() is given them.
        made = {}

        def init(rng, name):
            made.setdefault("tree", self.init_weights(rng))
            return made["tree"][name]
        for name in sorted({path.split("/")[0] for path in convert.diffusers_flax.expected_shapes(self.kl_config)}):
            self.param(name, init, name)

    def _native(self):
        """(flax-vae's module, this call's params in its tree)."""
        config = self.kl_config
        # parent=None: a separate top-level module applied to the restructured params, not a submodule of this one
        params = convert.from_diffusers_flax(self.variables["params"], config)
        return AutoencoderKL(config, dtype=self.dtype, parent=None), params

    def encode(self, sample, deterministic: bool = True, return_dict: bool = True):
        """(N, 3, H, W) in [-1, 1] -> FlaxAutoencoderKLOutput(latent_dist) (or a 1-tuple), NHWC latents."""
        module, params = self._native()
        mean, logvar = module.apply({"params": params}, jnp.transpose(sample, (0, 2, 3, 1)), method="posterior")
        posterior = DiagonalGaussian(mean, logvar)
        return FlaxAutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, latents, deterministic: bool = True, return_dict: bool = True):
        """Latents (N, h, w, C), or (N, C, h, w) when the last axis is not C -> FlaxDecoderOutput(sample)
        (or a 1-tuple), (N, 3, H, W)."""
        if latents.shape[-1] != self.latent_channels:
            latents = jnp.transpose(latents, (0, 2, 3, 1))
        module, params = self._native()
        images = jnp.transpose(module.apply({"params": params}, latents, method="decode"), (0, 3, 1, 2))
        return FlaxDecoderOutput(sample=images) if return_dict else (images,)

    def __call__(self, sample, sample_posterior: bool = False, deterministic: bool = True, return_dict: bool = True):
        """Encode then decode (N, 3, H, W): the posterior's mode, or a sample with the "gaussian" rng."""
        posterior = self.encode(sample, deterministic=deterministic).latent_dist
        latents = posterior.sample(self.make_rng("gaussian")) if sample_posterior else posterior.mode()
        images = self.decode(latents).sample
        return FlaxDecoderOutput(sample=images) if return_dict else (images,)

    def init_weights(self, rng) -> dict:
        """Random parameters (flax-vae's initialisers, drawn with `rng`) in diffusers' tree."""
        config = self.kl_config
        return convert.to_diffusers_flax(family.init_params(config, rng), config)

    @classmethod
    def from_kl_config(cls, config: KLConfig, sample_size: int = 32, dtype=jnp.float32) -> "FlaxAutoencoderKL":
        """The module of flax-vae's `config` (CheckpointError where diffusers' class cannot express it)."""
        fields = convert.diffusers_flax.diffusers_config(config, sample_size)
        return cls(**{name: tuple(fields[name]) if isinstance(fields[name], list) else fields[name]
                      for name in FIELDS}, dtype=dtype)

    def save_pretrained(self, save_directory, params, **ignored):
        """Write a diffusers Flax folder (config.json + diffusion_flax_model.msgpack). An existing folder is
        replaced whole, atomically."""
        _warn_ignored("save_pretrained", ignored)
        config = self.kl_config
        native = convert.from_diffusers_flax(params, config)
        convert.export(config, native, save_directory, to="diffusers-flax", overwrite=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, revision=None, dtype=jnp.float32,
                        from_pt=False, cache_dir=None, local_files_only=False, token=None, **ignored):
        """A local folder or Hub id (diffusers Flax msgpack, or PyTorch safetensors/.bin whatever `from_pt` says)
        -> (module, params in diffusers' tree, float32 as stored: `dtype` is the compute dtype)."""
        _warn_ignored("from_pretrained", ignored)
        located = resolve(pretrained_model_name_or_path, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                          local_files_only=local_files_only, token=token)
        config, params, _ = convert.load(**located)
        if config.family != "kl":
            raise CheckpointError(f"{pretrained_model_name_or_path}: a {config.family} model, not an "
                                  "AutoencoderKL; use flax_vae.load for it")
        module = cls.from_kl_config(config, sample_size=_sample_size(located["source"]), dtype=dtype)
        if module.kl_config != config:
            raise CheckpointError(f"{pretrained_model_name_or_path}: FlaxAutoencoderKL holds SD-style VAEs (quant "
                                  "convs, no latent statistics or shift); load this one with flax_vae.load")
        return module, convert.to_diffusers_flax(jax.tree.map(jnp.asarray, params), config)


def _sample_size(source) -> int:
    """config.json's sample_size (the size init_weights used; flax-vae's models do not need it), or the default."""
    path = Path(source) / "config.json"
    size = convert.checkpoint.read_json(path).get("sample_size") if path.is_file() else None
    return size if isinstance(size, int) and not isinstance(size, bool) else FlaxAutoencoderKL.sample_size


def _warn_ignored(what, ignored):
    if ignored:
        warnings.warn(f"FlaxAutoencoderKL.{what}: ignored arguments {sorted(ignored)}", stacklevel=3)
