"""flax_vae.FlaxAutoencoderKL against diffusers 0.39's FlaxAutoencoderKL: the same calls give the same numbers.

The reference outputs were made once with diffusers 0.39 in a separate venv (tests/data/diffusers_flax/README.md:
make_reference.py, its command and versions), on the top-left 128x128 crops of two bundled photographs: a small
config whose seeded weights are committed as a diffusers Flax folder, and the full SD 1.5 config whose weights
`seeded_params` regenerates here from the same seed. Tolerance: 1e-5 relative to the largest reference value
(float32, CPU; the two implementations order their sums differently: flax-vae chunks the attention softmax and
computes wide 3x3 convolutions as Winograd transforms on CPU).
"""
import json
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import seeded_params
from flax.training import common_utils

import flax_vae
from flax_vae import FlaxAutoencoderKL, convert

REF = Path(__file__).parent / "data" / "diffusers_flax"
TOL = 1e-5


def close(a, ref, tol=TOL):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    err = float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))
    assert err <= tol, err


def facts(tag):
    return json.loads((REF / f"{tag}_facts.json").read_text())


def inputs():
    crops = np.load(REF / "inputs.npz")
    x = np.stack([crops["astronaut_crop_hwc_uint8"], crops["coffee_crop_hwc_uint8"]]).astype(np.float32) / 127.5 - 1
    return x.transpose(0, 3, 1, 2)  # (2, 3, 128, 128), NCHW as diffusers takes it


@pytest.fixture(scope="module", params=["small", "sd15"])
def model(request):
    tag = request.param
    if tag == "small":
        module, params = FlaxAutoencoderKL.from_pretrained(REF / "small_vae")
    else:
        module = FlaxAutoencoderKL(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in facts("sd15")["constructor_kwargs"].items()})
        params = flax.traverse_util.unflatten_dict(seeded_params(facts("sd15")["paths_shapes"],
                                                                 facts("sd15")["seed"]), sep="/")
    apply = jax.jit(module.apply, static_argnames=("method", "deterministic", "return_dict", "sample_posterior"))
    return tag, module, params, np.load(REF / f"{tag}_outputs.npz"), apply


def test_the_params_tree_is_diffusers(model):
    tag, module, params, _, _ = model
    paths = {"/".join(str(k.key) for k in path): list(leaf.shape) for path, leaf in jax.tree.leaves_with_path(params)}
    assert paths == facts(tag)["paths_shapes"]
    init = jax.eval_shape(module.init_weights, jax.random.key(0))
    assert jax.tree.structure(init) == jax.tree.structure(params)
    assert [a.shape for a in jax.tree.leaves(init)] == [a.shape for a in jax.tree.leaves(params)]


def test_encode_matches_diffusers(model):
    tag, module, params, ref, apply = model
    x = inputs()
    for batch, images in (("enc1", x[:1]), ("enc2", x))[:2 if tag == "small" else 1]:  # SD 1.5: one compile
        dist = apply({"params": params}, images, deterministic=True, method=module.encode).latent_dist
        close(dist.mean, ref[f"{batch}_mean"])
        close(dist.logvar, ref[f"{batch}_logvar"])
        close(dist.mode(), ref[f"{batch}_mean"])
        sample = dist.sample(jax.random.PRNGKey(0))
        close(sample, ref[f"{batch}_sample_key0"])
        close(dist.kl(), ref[f"{batch}_kl"])
        close(dist.nll(sample), ref[f"{batch}_nll_sample_key0"])
        if batch == "enc1":
            close(dist.std, ref["enc1_std"])
            close(dist.var, ref["enc1_var"])
    if tag == "small":  # the rest is the interface's, on the small config
        both = apply({"params": params}, x, method=module.encode).latent_dist
        other = apply({"params": params}, x[::-1], method=module.encode).latent_dist
        close(both.kl(other), ref["enc2_kl_other_enc2rev"])
        (first,) = apply({"params": params}, x[:1], method=module.encode, return_dict=False)
        close(first.mean, ref["enc1_mean"])


def test_decode_takes_nhwc_or_nchw_and_returns_nchw(model):
    tag, module, params, ref, apply = model
    mean = ref["enc1_mean"]  # NHWC latents
    close(apply({"params": params}, mean, method=module.decode).sample, ref["dec1_from_nhwc_mean"])
    if tag == "sd15":  # one decode compile for the full configuration; the layouts below are the interface's
        return
    close(apply({"params": params}, mean.transpose(0, 3, 1, 2), method=module.decode).sample,
          ref["dec1_from_nhwc_mean"])
    (images,) = apply({"params": params}, mean, method=module.decode, return_dict=False)
    close(images, ref["dec1_from_nhwc_mean"])
    close(apply({"params": params}, ref["enc2_sample_key0"], method=module.decode).sample,
          ref["dec2_from_nhwc_sample_key0"])
    # (1, 4, 4, 4): the last axis is the channel count, so it is taken as NHWC, as diffusers did
    close(apply({"params": params}, ref["dec_ambiguous_in_1x4x4x4"], method=module.decode).sample,
          ref["dec_ambiguous_out"])


@pytest.mark.parametrize("model", ["small"], indirect=True)  # SD 1.5's numbers: encode and decode above
def test_call_samples_with_the_gaussian_rng(model):
    _, module, params, ref, apply = model
    x = inputs()[:1]
    out = apply({"params": params}, x, sample_posterior=True, rngs={"gaussian": jax.random.PRNGKey(1)})
    close(out.sample, ref["call1_sample_posterior_true_gaussian_key1"])
    close(apply({"params": params}, x).sample, ref["dec1_from_nhwc_mean"])


def test_config_and_attributes():
    module, _ = FlaxAutoencoderKL.from_pretrained(REF / "small_vae")
    attrs = facts("small")["attrs"]
    for name in flax_vae.diffusers_compat.FIELDS:
        assert list(np.atleast_1d(getattr(module, name))) == list(np.atleast_1d(attrs[name]["value"])), name
        assert module.config[name] == getattr(module.config, name) == getattr(module, name)
    assert module.dtype == jnp.float32 and module.config.scaling_factor == 0.18215
    with pytest.raises(TypeError, match="read-only"):
        module.config["scaling_factor"] = 1.0


def test_jit_and_sharded_inputs_give_the_same_numbers():
    module, params = FlaxAutoencoderKL.from_pretrained(REF / "small_vae")
    ref = np.load(REF / "small_outputs.npz")
    x = inputs()
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode).latent_dist)
    dist = encode(params, x)  # the distribution is a pytree: jit can return it
    close(dist.mean, ref["enc2_mean"])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    close(encode(params, sharded).mean, ref["enc2_mean"])


def test_the_diffusers_training_example_runs_unchanged():
    """examples/text_to_image/train_text_to_image_flax.py's VAE calls (pmap over replicated params), with only
    the import changed."""
    from flax import jax_utils
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(str(REF), subfolder="small_vae", revision=None,
                                                        dtype=jnp.float32)
    ref = np.load(REF / "small_outputs.npz")
    devices = jax.local_device_count()
    batch = {"pixel_values": np.repeat(inputs()[:1], devices, axis=0)}

    def train_step(vae_params, batch, sample_rng):
        vae_outputs = vae.apply({"params": vae_params}, batch["pixel_values"], deterministic=True,
                                method=vae.encode)
        latents = vae_outputs.latent_dist.sample(sample_rng)
        latents = jnp.transpose(latents, (0, 3, 1, 2))  # (NHWC) -> (NCHW)
        return latents * vae.config.scaling_factor

    p_train_step = jax.pmap(train_step, "batch")
    latents = p_train_step(jax_utils.replicate(vae_params), common_utils.shard(batch),
                           jax_utils.replicate(jax.random.PRNGKey(0)))
    assert latents.shape == (devices, 1, 4, 64, 64)
    expected = ref["enc1_sample_key0"].transpose(0, 3, 1, 2) * 0.18215
    for d in range(devices):
        close(latents[d], expected)


@flax.struct.dataclass
class StableVAE:
    """The shape of jax-diffusion-transformer's stable_vae.py helper: a static module beside its params."""
    params: dict
    module: FlaxAutoencoderKL = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, path) -> "StableVAE":
        module, params = FlaxAutoencoderKL.from_pretrained(path)
        params = jax.device_get(params)
        return cls(params=params, module=module)

    @jax.jit
    def encode(self, key, images, scale=True):
        images = jnp.transpose(images, (0, 3, 1, 2))  # b h w c -> b c h w
        latent_dist = self.module.apply({"params": self.params}, images, method=self.module.encode).latent_dist
        latents = latent_dist.sample(key)
        return latents * self.module.config.scaling_factor if scale else latents

    @jax.jit
    def decode(self, latents, scale=True):
        if scale:
            latents = latents / self.module.config.scaling_factor
        images = self.module.apply({"params": self.params}, latents, method=self.module.decode).sample
        return jnp.transpose(images, (0, 2, 3, 1))  # b c h w -> b h w c


def test_the_stable_vae_helper_runs_unchanged():
    vae = StableVAE.create(str(REF / "small_vae"))
    ref = np.load(REF / "small_outputs.npz")
    images = inputs()[:1].transpose(0, 2, 3, 1)
    latents = vae.encode(jax.random.PRNGKey(0), images)
    close(latents, ref["enc1_sample_key0"] * 0.18215)
    close(vae.decode(jnp.asarray(ref["enc1_mean"]) * 0.18215), ref["dec1_from_nhwc_mean"].transpose(0, 2, 3, 1))


def test_save_pretrained_from_pretrained_round_trip_is_bit_exact(tmp_path):
    module, params = FlaxAutoencoderKL.from_pretrained(REF / "small_vae")
    module.save_pretrained(tmp_path / "vae", params=params)
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == sorted(facts("small")["save_pretrained_files"])
    again, params2 = FlaxAutoencoderKL.from_pretrained(tmp_path / "vae")
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
    assert again.kl_config == module.kl_config


def test_module_init_makes_the_tree_and_native_users_get_the_same_model():
    module, params = FlaxAutoencoderKL.from_pretrained(REF / "small_vae")
    made = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, 8, 8)))["params"]  # as nnx.bridge
    assert jax.tree.structure(made) == jax.tree.structure(params)
    vae = flax_vae.load(REF / "small_vae")  # the native API on the same folder
    x = inputs()[:1]
    mean = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode).latent_dist.mean)(params, x)
    close(vae.encode(x.transpose(0, 2, 3, 1)), mean, tol=1e-6)
    native = convert.from_diffusers_flax(params, module.kl_config)  # and the tree a user holds, converted
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(vae.params)))


def test_other_models_are_refused_clearly(tmp_path):
    flax_vae.save(flax_vae.load("taesd"), tmp_path / "taesd", to="diffusers")
    with pytest.raises(flax_vae.CheckpointError, match="not an AutoencoderKL"):
        FlaxAutoencoderKL.from_pretrained(tmp_path / "taesd")
    with pytest.warns(UserWarning, match="ignored arguments"):
        FlaxAutoencoderKL.from_pretrained(REF / "small_vae", _do_init=False)
