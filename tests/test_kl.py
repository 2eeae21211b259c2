"""AutoencoderKL: parity with diffusers' PyTorch models, checkpoint formats, attention, precision, bad inputs."""
import dataclasses
import json
import os
import pickle
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchKL
from diffusers import AutoencoderKLFlux2 as TorchKLFlux2
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from safetensors.torch import save_file

import flax_vae
from flax_vae.convert import CheckpointError
from flax_vae.family import init_params
from flax_vae.kl import AutoencoderKL, KLConfig, attention

from conftest import crop, max_abs_rel

TOL = 1e-4
SD_BLOCKS = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# The presets' real diffusers configurations (runwayml/sd-v1-5, sd3-medium, FLUX.1-dev, FLUX.2-dev vae/config.json).
TORCH_CONFIGS = {
    "sd15": (TorchKL, dict(SD_BLOCKS, latent_channels=4, scaling_factor=0.18215)),
    "sd3": (TorchKL, dict(SD_BLOCKS, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                          use_quant_conv=False, use_post_quant_conv=False)),
    "flux1": (TorchKL, dict(SD_BLOCKS, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                            use_quant_conv=False, use_post_quant_conv=False)),
    "flux2": (TorchKLFlux2, dict(SD_BLOCKS, latent_channels=32)),
}

# diffusers -> original LDM names: the inverse of the loader's mapping, written independently as data.
LDM_NAMES = [
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d)\.resnets\.(\d)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"decoder.up.{3 - int(m[1])}.block.{m[2]}."),
    (r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.up.{3 - int(m[1])}.upsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def ldm_state_dict(torch_model, prefix=""):
    out = {}
    for key, value in torch_model.state_dict().items():
        for pattern, repl in LDM_NAMES:
            key = re.sub(pattern, repl, key)
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]  # LDM stores the attention projections as 1x1 convs
        out[prefix + key] = value.contiguous()
    return out


def make_torch(preset, seed=0):
    cls, cfg = TORCH_CONFIGS[preset]
    torch.manual_seed(seed)
    model = cls(**cfg).eval()
    with torch.no_grad():  # non-trivial norms and statistics, so a mix-up of them cannot pass unnoticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        if preset == "flux2":
            model.bn.running_mean.copy_(0.5 * torch.randn_like(model.bn.running_mean))
            model.bn.running_var.copy_(0.5 + torch.rand_like(model.bn.running_var))
    return model


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_reference(model, images):
    with torch.no_grad():
        dist = model.encode(nchw(images)).latent_dist
        return nhwc(dist.mean), nhwc(dist.logvar), nhwc(model.decode(dist.mean).sample)


def assert_parity(vae, images, ref, what):
    mean, logvar = vae.posterior(images)
    errors = {"mean": max_abs_rel(mean, ref[0]), "logvar": max_abs_rel(logvar, ref[1]),
              "decode": max_abs_rel(vae.decode(ref[0]), ref[2])}
    print(f"{what}: max relative errors {errors}")
    assert max(errors.values()) <= TOL, errors


@pytest.fixture(scope="module")
def sd15(photos, tmp_path_factory):
    """The SD 1.5 VAE (random weights), its diffusers folder, and PyTorch's outputs on a 256x256 photo."""
    model = make_torch("sd15")
    folder = tmp_path_factory.mktemp("kl") / "sd15-vae"
    model.save_pretrained(folder)
    images = crop(photos["astronaut"][128:384, 128:384], 8)[None]
    return model, folder, images, torch_reference(model, images)


@pytest.fixture(scope="module")
def small_images(photos):
    return photos["coffee"][100:164, 200:264][None]  # 64x64


def test_attention_matches_softmax():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 300, 64)).astype(np.float32) * s for s in (4.0, 4.0, 1.0))  # peaky logits
    logits = np.einsum("nqd,nkd->nqk", q.astype(np.float64), k) / 8.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("nqk,nkd->nqd", p / p.sum(-1, keepdims=True), v)
    for chunk in (64, 128, 300, 1024):  # 300 tokens: partial last chunks, a single chunk, a chunk larger than T
        out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk=chunk)
        assert max_abs_rel(out, ref) < 1e-5, chunk


def test_attention_memory_does_not_grow_with_tokens_squared():
    # A decoder whose mid block sees 16,384 tokens (a 1024x1024 decode's count): full logits would be 1 GiB.
    config = KLConfig(block_out_channels=(32,), layers_per_block=1)
    module = AutoencoderKL(config)
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"])
    z = jax.ShapeDtypeStruct((1, 128, 128, 4), jnp.float32)
    compiled = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode)).lower(params, z).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"decode temp memory at 16,384 tokens: {temp / 2**20:.1f} MiB")
    assert temp < 128 * 2**20


BAND_CONFIG = KLConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)  # 2x: 22x24 -> 44x48


def program(module, params, latents) -> str:
    return str(jax.make_jaxpr(flax_vae.decode_fn, static_argnums=0)(module, params, latents))


def loops(module, params, latents):
    """How many loops (scan, while) the decode's program has: the bands' sweeps are loops."""
    jaxpr = program(module, params, latents)
    return jaxpr.count("scan[") + jaxpr.count("while[")


@pytest.fixture(scope="module")
def band_params():
    """BAND_CONFIG's decoder, with non-trivial norms too (scale 1 +- 0.2, bias +- 0.2)."""
    init = jax.jit(lambda key: AutoencoderKL(BAND_CONFIG).init(key, jnp.zeros((1, 4, 4, 4)), method="decode"))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: a + 0.2 * rng.normal(size=a.shape).astype(np.float32),
                        init(jax.random.PRNGKey(0))["params"])


@pytest.mark.parametrize("band_above, band_rows", [
    (0, 5),  # both stages in bands (the mid block's output, then upsampled bands); 5 rounds up to 6: 7.3 bands
    (200_000, 12),  # the last stage only (44x48x64 float32 is 540,672 bytes), reading the upsampled 22x24 stage
])
def test_decode_in_bands_matches_unbanded(band_params, band_above, band_rows):
    z = np.random.default_rng(1).normal(size=(2, 22, 24, 4)).astype(np.float32)  # batch 2
    unbanded = AutoencoderKL(BAND_CONFIG, band_above=None)
    banded = AutoencoderKL(BAND_CONFIG, band_above=band_above, band_rows=band_rows)
    assert loops(banded, band_params, z) > loops(unbanded, band_params, z)  # it did run in bands
    decode = jax.jit(flax_vae.decode_fn, static_argnums=0)
    error = max_abs_rel(decode(banded, band_params, z), decode(unbanded, band_params, z))
    print(f"band_above={band_above} band_rows={band_rows}: max relative error {error:.1e}")
    assert error <= 1e-5


def test_decode_in_bands_where_it_pays():
    """SD's VAE in float32: 512x512 unbanded (the same program as band_above=None); 1024x1024 in bands, XLA's buffer
    plan holding 1098 MiB of temporaries where the unbanded decode's holds 3584 MiB (measured)."""
    config = flax_vae.KL_PRESETS["sd15"]
    params = jax.eval_shape(lambda: init_params(config))
    latents = lambda size: jax.ShapeDtypeStruct((1, size // 8, size // 8, 4), jnp.float32)
    banded, unbanded = AutoencoderKL(config), AutoencoderKL(config, band_above=None)
    assert program(banded, params, latents(512)) == program(unbanded, params, latents(512))
    plan = jax.jit(flax_vae.decode_fn, static_argnums=0).lower(banded, params, latents(1024)).compile()
    temp = plan.memory_analysis().temp_size_in_bytes
    print(f"1024x1024 decode in bands: {temp / 2**20:.0f} MiB of temporaries")
    assert temp < 1200 * 2**20


def test_sd15_parity_256_from_diffusers_folder(sd15):
    model, folder, images, ref = sd15
    vae = flax_vae.load(folder)
    assert vae.name == "sd15" and vae.config == flax_vae.KL_PRESETS["sd15"]
    assert_parity(vae, images, ref, "sd15 256x256")
    np.testing.assert_array_equal(vae.encode(images), vae.posterior(images)[0])


def test_sd15_ldm_single_files(sd15, tmp_path):
    model, folder, images, ref = sd15
    # a full SD checkpoint: the VAE next to the UNet
    tensors = dict(ldm_state_dict(model, "first_stage_model."), **{"model.diffusion_model.out.0.weight": torch.ones(4)})
    save_file(tensors, tmp_path / "v1-5-pruned.safetensors")
    vae = flax_vae.load(tmp_path / "v1-5-pruned.safetensors")
    assert vae.name == "sd15"
    assert_parity(vae, images, ref, "sd15 LDM first_stage_model. single file")
    # a bare VAE training checkpoint (vae-ft-mse-840000-ema-pruned.ckpt): tensors under state_dict, a plain counter
    torch.save({"state_dict": ldm_state_dict(model), "global_step": 840000}, tmp_path / "vae-ft-mse.ckpt")
    jax.tree.map(np.testing.assert_array_equal, flax_vae.load(tmp_path / "vae-ft-mse.ckpt").params, vae.params)
    # one side only, as extracted encoders/decoders are shipped: the architecture is read from that side
    bare = ldm_state_dict(model)
    for side, own in (("encoder", ("encoder.", "quant_conv.")), ("decoder", ("decoder.", "post_quant_conv."))):
        save_file({k: v for k, v in bare.items() if k.startswith(own)}, tmp_path / f"sd15_vae_{side}.safetensors")
        half = flax_vae.load(tmp_path / f"sd15_vae_{side}.safetensors")
        assert half.config == vae.config and list(half.params) == [side]
        jax.tree.map(np.testing.assert_array_equal, half.params[side], vae.params[side])
    with pytest.raises(ValueError, match="without its encoder"):
        half.encode(images)


def test_flux1_and_sd3_parity_and_ae_safetensors(small_images, tmp_path):
    model = make_torch("flux1")
    ref = torch_reference(model, small_images)
    model.save_pretrained(tmp_path / "flux1")
    vae = flax_vae.load(tmp_path / "flux1")
    assert vae.name == "flux1" and (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    assert_parity(vae, small_images, ref, "flux1 64x64")
    save_file(ldm_state_dict(model), tmp_path / "ae.safetensors")  # FLUX's file: bare LDM names, no quant convs
    ae = flax_vae.load(tmp_path / "ae.safetensors")
    assert ae.config == vae.config
    assert_parity(ae, small_images, ref, "flux1 ae.safetensors")
    save_file(ldm_state_dict(model, "first_stage_model."), tmp_path / "sd3_medium.safetensors")
    assert flax_vae.load(tmp_path / "sd3_medium.safetensors").config == flax_vae.KL_PRESETS["sd3"]


def test_flux2_parity_and_latent_normalisation(small_images, tmp_path):
    model = make_torch("flux2")
    ref = torch_reference(model, small_images)
    model.save_pretrained(tmp_path / "flux2")
    vae = flax_vae.load(tmp_path / "flux2")
    assert vae.name == "flux2" and vae.config.latent_batch_norm
    assert_parity(vae, small_images, ref, "flux2 64x64")
    # the pipeline's own patchify and BatchNorm normalisation (Flux2Pipeline, diffusers 0.42)
    latents = Flux2Pipeline._patchify_latents(nchw(ref[0]))
    bn_mean = model.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
    expected = nhwc((latents - bn_mean) / bn_std)
    scaled = vae.scale_latents(ref[0])
    assert scaled.shape == (1, 4, 4, 128) and max_abs_rel(scaled, expected) < 1e-5
    assert max_abs_rel(vae.unscale_latents(scaled), ref[0]) < 1e-5


def test_scale_latents_conventions(sd15):
    z = np.random.default_rng(0).normal(size=(2, 4, 4, 4)).astype(np.float32)
    sdxl = dataclasses.replace(flax_vae.load(sd15[1]), config=flax_vae.KL_PRESETS["sdxl"],
                               module=AutoencoderKL(flax_vae.KL_PRESETS["sdxl"]))
    np.testing.assert_allclose(sdxl.scale_latents(z), z * 0.13025, rtol=1e-6)
    # a config carrying latents_mean / latents_std: SDXL pipelines' (z - mean) * scaling / std
    mean, std = (0.1, -0.2, 0.3, 0.0), (1.5, 0.5, 2.0, 1.0)
    config = dataclasses.replace(flax_vae.KL_PRESETS["sdxl"], latents_mean=mean, latents_std=std)
    vae = dataclasses.replace(sdxl, config=config, module=AutoencoderKL(config))
    expected = (z - np.array(mean, np.float32)) * 0.13025 / np.array(std, np.float32)
    np.testing.assert_allclose(vae.scale_latents(z), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vae.unscale_latents(expected), z, rtol=1e-5, atol=1e-5)
    sd3 = dataclasses.replace(sdxl, config=flax_vae.KL_PRESETS["sd3"], module=AutoencoderKL(flax_vae.KL_PRESETS["sd3"]))
    np.testing.assert_allclose(sd3.scale_latents(z), (z - 0.0609) * 1.5305, rtol=1e-5, atol=1e-6)


def test_sampling_from_the_posterior(sd15, small_images):
    vae = flax_vae.load(sd15[1])
    images = np.concatenate([small_images, small_images[:, ::-1], small_images[:, :, ::-1], -small_images])
    mean, logvar = vae.posterior(images)
    a, b = vae.encode(images, key=jax.random.PRNGKey(1)), vae.encode(images, key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, vae.encode(images, key=jax.random.PRNGKey(1)))
    noise = (np.asarray(a) - mean) / np.exp(0.5 * np.asarray(logvar))
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1  # 1024 values
    assert not np.array_equal(a, b)


def test_round_trip_torch_flax_torch_is_bit_identical(sd15, tmp_path):
    model, folder, _, _ = sd15
    vae = flax_vae.load(folder)
    flax_vae.save(vae, tmp_path / "diffusers", to="diffusers")
    back = TorchKL.from_pretrained(tmp_path / "diffusers").state_dict()
    original = model.state_dict()
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    flax_vae.save(vae, tmp_path / "native")
    again = flax_vae.load(tmp_path / "native")
    assert again.config == vae.config
    jax.tree.map(np.testing.assert_array_equal, again.params, vae.params)


def test_flux2_export_round_trip(tmp_path):
    model = make_torch("flux2", seed=1)
    model.save_pretrained(tmp_path / "in")
    flax_vae.save(flax_vae.load(tmp_path / "in"), tmp_path / "out", to="diffusers")
    back = TorchKLFlux2.from_pretrained(tmp_path / "out").state_dict()
    for key, value in model.state_dict().items():
        if key != "bn.num_batches_tracked":  # a training counter: written back as 0
            assert torch.equal(back[key], value), key


def test_bad_inputs(sd15):
    vae = flax_vae.load(sd15[1])
    good = np.zeros((1, 64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="NCHW"):
        vae.encode(good.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="batch"):
        vae.encode(good[0])
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(good[:, :60])
    with pytest.raises(ValueError, match="NaN"):
        vae.encode(np.where(good == 0, np.nan, good))
    with pytest.raises(ValueError, match="4 channels"):
        vae.decode(np.zeros((1, 8, 8, 16), np.float32))
    with pytest.raises(ValueError, match="deterministic"):
        flax_vae.load("taesd").encode(good, key=jax.random.PRNGKey(0))


def test_float16_overflow_is_reported_and_bfloat16_works(sd15, small_images):
    model, folder = sd15[:2]
    ref = torch_reference(model, small_images)
    vae = flax_vae.load(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert jax.tree.leaves(vae.params)[0].dtype == jnp.float32
    mean = vae.encode(small_images)
    assert mean.dtype == jnp.bfloat16 and max_abs_rel(mean, ref[0]) < 0.05
    # push the activations past float16's 65504, as the SDXL VAE's do in float16
    big = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 1e6 if "conv_out" in jax.tree_util.keystr(path) else a, vae.params)
    fp16 = dataclasses.replace(vae, params=big, module=AutoencoderKL(vae.config, dtype=jnp.float16))
    with pytest.raises(FloatingPointError, match=r"\(float16 compute\), first in the output of decoder/conv_out; "
                                                 r"load it with dtype=jnp.bfloat16.*fp16-fix"):
        fp16.decode(ref[0])


def test_corrupt_and_mismatched_files(sd15, tmp_path):
    model = sd15[0]
    tensors = ldm_state_dict(model)
    save_file(tensors, tmp_path / "vae.safetensors")
    data = (tmp_path / "vae.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        flax_vae.load(tmp_path / "truncated.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "decoder.mid.attn_1.k.weight"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.mid\.attn_1\.k\.weight"):
        flax_vae.load(tmp_path / "missing.safetensors")
    wrong = dict(tensors, **{"encoder.conv_out.bias": torch.zeros(5)})
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match="encoder.conv_out.bias has shape"):
        flax_vae.load(tmp_path / "wrong.safetensors")
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(sd15[1] / "diffusion_pytorch_model.safetensors", folder)
    (folder / "config.json").write_text(json.dumps(dict(model.config, _class_name="AutoencoderKL", act_fn="relu")))
    with pytest.raises(CheckpointError, match="unsupported AutoencoderKL configuration"):
        flax_vae.load(folder)


class _Payload:
    def __reduce__(self):  # unpickling this would create a file
        return (open, ("/tmp/flax_vae_kl_pickle_was_executed", "w"))


def test_ckpt_with_pickled_objects_is_refused_unexecuted(sd15, tmp_path):
    marker = "/tmp/flax_vae_kl_pickle_was_executed"
    path = tmp_path / "sd-v1-5.ckpt"
    tensors = ldm_state_dict(sd15[0], "first_stage_model.")
    torch.save({"state_dict": tensors, "callbacks": _Payload()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(CheckpointError, match="never unpickled.*out.safetensors"):
        flax_vae.load(path)
    assert not os.path.exists(marker)

