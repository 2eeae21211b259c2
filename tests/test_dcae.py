"""DC-AE against diffusers' PyTorch AutoencoderDC (random weights, seeded), both checkpoint layouts, strictness.

Every released architecture is tested at reduced widths (every channel count / 8: same stages, depths,
block types, head dim, shortcut group sizes) at a small size (deep stages take the quadratic attention
form, H*W <= 32) and a size where every attention takes the linear form; the full f32c32 (sana) at 512x512
and the full lite f32c32 (sana's encoder, a smaller decoder) at 256x256.
"""
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_abs_rel
from diffusers import AutoencoderDC

from flax_vae import convert
import flax_vae
from flax_vae.convert import dcae as cdcae
from flax_vae.convert.checkpoint import CheckpointError
from flax_vae.dcae import DCAE, PRESETS

TOL = 1e-4
RES, VIT = "ResBlock", "EfficientViTBlock"
# The released diffusers configs (hub config.json files / diffusers' conversion script), written out here
# so that the presets are checked against them, not against our own export. The lite one is transcribed from
# MIT-HAN's efficientvit (dc_ae.py, "dc-ae-lite-f32c32-sana-1.1"); its decoder_qkv_multiscales is left at
# diffusers' default, which names (5,) for stages that hold residual blocks only.
IN_MIX = dict(downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle")
HUB = {
    "f32-sana": dict(latent_channels=32, encoder_block_types=[RES] * 3 + [VIT] * 3,
                     decoder_block_types=[RES] * 3 + [VIT] * 3,
                     encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
                     decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
                     encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
                     encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
                     decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
                     downsample_block_type="Conv", upsample_block_type="interpolate",
                     decoder_norm_types="rms_norm", decoder_act_fns="silu"),
    "f32-lite": dict(latent_channels=32, encoder_block_types=[RES] * 3 + [VIT] * 3, decoder_block_types=RES,
                     encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
                     decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
                     encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[0, 3, 5, 4, 4, 4],
                     encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
                     downsample_block_type="Conv", upsample_block_type="pixel_shuffle",
                     decoder_norm_types="rms_norm", decoder_act_fns="silu", decoder_conv_act_fn="silu"),
    "f32-in-mix": dict(latent_channels=32, encoder_block_types=[RES] * 3 + [VIT] * 3,
                       decoder_block_types=[RES] * 3 + [VIT] * 3,
                       encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
                       decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
                       encoder_layers_per_block=[0, 4, 8, 2, 2, 2], decoder_layers_per_block=[0, 5, 10, 2, 2, 2],
                       encoder_qkv_multiscales=[[]] * 6, decoder_qkv_multiscales=[[]] * 6,
                       decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 3,
                       decoder_act_fns=["relu"] * 3 + ["silu"] * 3, **IN_MIX),
    "f64-in-mix": dict(latent_channels=128, encoder_block_types=[RES] * 3 + [VIT] * 4,
                       decoder_block_types=[RES] * 3 + [VIT] * 4,
                       encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024, 2048],
                       decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024, 2048],
                       encoder_layers_per_block=[0, 4, 8, 2, 2, 2, 2],
                       decoder_layers_per_block=[0, 5, 10, 2, 2, 2, 2],
                       encoder_qkv_multiscales=[[]] * 7, decoder_qkv_multiscales=[[]] * 7,
                       decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 4,
                       decoder_act_fns=["relu"] * 3 + ["silu"] * 4, **IN_MIX),
    "f128-in-mix": dict(latent_channels=512, encoder_block_types=[RES] * 3 + [VIT] * 5,
                        decoder_block_types=[RES] * 3 + [VIT] * 5,
                        encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024, 2048, 2048],
                        decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024, 2048, 2048],
                        encoder_layers_per_block=[0, 4, 8, 2, 2, 2, 2, 2],
                        decoder_layers_per_block=[0, 5, 10, 2, 2, 2, 2, 2],
                        encoder_qkv_multiscales=[[]] * 8, decoder_qkv_multiscales=[[]] * 8,
                        decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 5,
                        decoder_act_fns=["relu"] * 3 + ["silu"] * 5, **IN_MIX),
}
RELEASED = {  # name -> (architecture, scaling factor from the issue / model cards)
    "dc-ae-f32c32-sana-1.0": ("f32-sana", 0.41407), "dc-ae-f32c32-sana-1.1": ("f32-sana", 0.41407),
    "dc-ae-lite-f32c32-sana-1.1": ("f32-lite", 0.41407),
    "dc-ae-f32c32-in-1.0": ("f32-in-mix", 0.3189), "dc-ae-f32c32-mix-1.0": ("f32-in-mix", 0.4552),
    "dc-ae-f64c128-in-1.0": ("f64-in-mix", 0.2889), "dc-ae-f64c128-mix-1.0": ("f64-in-mix", 0.4538),
    "dc-ae-f128c512-in-1.0": ("f128-in-mix", 0.4883), "dc-ae-f128c512-mix-1.0": ("f128-in-mix", 0.3620),
}
# (small size: quadratic attention in the deepest stages, size where every stage's H*W > 32)
SIZES = {"f32-sana": ((64, 96), (256, 192)), "f32-lite": ((64, 96), (256, 192)),
         "f32-in-mix": ((64, 96), (256, 192)), "f64-in-mix": ((128, 192), (384, 384)),
         "f128-in-mix": ((128, 256), (768, 768))}

# diffusers key -> original MIT-HAN key, written independently of convert/dcae.py. Applied in order.
TO_MIT = [
    (r"^encoder\.conv_in\.conv\.", "encoder.project_in.conv.conv."),
    (r"^encoder\.conv_in\.", "encoder.project_in.conv."),
    (r"^encoder\.conv_out\.", "encoder.project_out.main.op_list.0.conv."),
    (r"^decoder\.conv_in\.", "decoder.project_in.main.conv."),
    (r"^decoder\.norm_out\.", "decoder.project_out.op_list.0."),
    (r"^decoder\.conv_out\.conv\.", "decoder.project_out.op_list.2.conv.conv."),
    (r"^decoder\.conv_out\.", "decoder.project_out.op_list.2.conv."),
    (r"^(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(\d+)\.", r"\1.stages.\2.op_list.\3."),
    (r"(op_list\.\d+)\.conv([12])\.", r"\1.main.conv\2.conv."),
    (r"(op_list\.\d+)\.norm\.", r"\1.main.conv2.norm."),
    (r"\.attn\.to_qkv_multiscale\.(\d+)\.proj_in\.", r".context_module.main.aggreg.\1.0."),
    (r"\.attn\.to_qkv_multiscale\.(\d+)\.proj_out\.", r".context_module.main.aggreg.\1.1."),
    (r"\.attn\.to_out\.", ".context_module.main.proj.conv."),
    (r"\.attn\.norm_out\.", ".context_module.main.proj.norm."),
    (r"\.attn\.to_([qkv])\.", r".context_module.main.to_\1."),
    (r"\.conv_out\.conv_inverted\.", ".local_module.main.inverted_conv.conv."),
    (r"\.conv_out\.conv_depth\.", ".local_module.main.depth_conv.conv."),
    (r"\.conv_out\.conv_point\.", ".local_module.main.point_conv.conv."),
    (r"\.conv_out\.norm\.", ".local_module.main.point_conv.norm."),
    (r"^decoder\.(stages\.\d+\.op_list\.0)\.conv\.", r"decoder.\1.main.conv.conv."),  # up block
]
TO_MIT_DOWN = {True: r"\1.main.conv.conv.", False: r"\1.main.conv."}  # pixel-unshuffle / strided conv


def to_mit(sd, pixel_unshuffle):
    out = {}
    for key, value in sd.items():
        for pattern, repl in TO_MIT:
            key = re.sub(pattern, repl, key)
        key = re.sub(r"^(encoder\.stages\.\d+\.op_list\.\d+)\.conv\.", TO_MIT_DOWN[pixel_unshuffle], key)
        out[key] = value
    for key in [k for k in out if k.endswith(".to_q.weight")]:  # fused qkv, a 1x1 conv
        stem = key[: -len(".to_q.weight")]
        out[f"{stem}.qkv.conv.weight"] = np.concatenate(
            [out.pop(f"{stem}.to_{p}.weight") for p in "qkv"])[:, :, None, None]
    for key in [k for k in out if k.endswith(".proj.conv.weight")]:
        out[key] = out[key][:, :, None, None]
    return out


def reduced(cfg, k=8):
    widths = {f"{p}_block_out_channels": [w // k for w in cfg[f"{p}_block_out_channels"]] for p in ("encoder", "decoder")}
    return {**cfg, "latent_channels": cfg["latent_channels"] // k, **widths}


def torch_model(cfg, seed=0):
    """AutoencoderDC with random weights, norm weights/biases and BatchNorm running statistics included."""
    torch.manual_seed(seed)
    model = AutoencoderDC(**cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("running_mean") or (".norm" in name and name.endswith("bias")):
                t.copy_(0.1 * torch.randn_like(t))
            elif ".norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
    return model


def state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def reference(model, images):
    with torch.no_grad():
        z = model.encode(nchw(images)).latent
        return nhwc(z), nhwc(model.decode(z).sample)


def images(h, w, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (1, h, w, 3)).astype(np.float32)


def autoencoder(config, params):
    return flax_vae.Autoencoder(config=config, module=DCAE(config), params=params)


@pytest.fixture(scope="module", params=list(HUB))
def arch(request):
    cfg = reduced(HUB[request.param])
    model = torch_model(cfg)
    config = cdcae.config_from_diffusers(cfg, request.param)
    return request.param, cfg, model, config, cdcae.from_diffusers(state_dict(model), config)


def test_presets_are_the_released_configs():
    assert set(PRESETS) == set(RELEASED)
    for name, (arch_name, scale) in RELEASED.items():
        assert cdcae.config_from_diffusers({**HUB[arch_name], "scaling_factor": scale}, name) == PRESETS[name]
    lite = {**HUB["f32-lite"], "decoder_qkv_multiscales": [[]] * 6, "scaling_factor": 0.41407}
    assert cdcae.config_from_diffusers(lite, "lite") == PRESETS["dc-ae-lite-f32c32-sana-1.1"]


@pytest.mark.parametrize("which", [0, 1], ids=["small-quadratic", "linear"])
def test_parity_with_diffusers(arch, which):
    name, cfg, model, config, params = arch
    x = images(*SIZES[name][which])
    z_ref, y_ref = reference(model, x)
    vae = autoencoder(config, params)
    z = vae.encode(x)
    y = vae.decode(z_ref)
    assert z.shape == z_ref.shape and y.shape == x.shape
    assert max_abs_rel(z, z_ref) <= TOL and max_abs_rel(y, y_ref) <= TOL, (max_abs_rel(z, z_ref), max_abs_rel(y, y_ref))


def test_mit_layout_gives_identical_parameters(arch):
    name, cfg, model, config, params = arch
    mit = to_mit(state_dict(model), config.downsample == "pixel_unshuffle")
    assert any(".qkv.conv.weight" in k for k in mit) and any(k.startswith("encoder.project_in.") for k in mit)
    _, mit_params = cdcae.from_mit(mit, "mit", config)
    flat, mit_flat = convert.rules.flatten(params), convert.rules.flatten(mit_params)
    assert flat.keys() == mit_flat.keys()
    assert all(np.array_equal(flat[k], mit_flat[k]) for k in flat)


def test_diffusers_export_round_trip(arch, tmp_path):
    name, cfg, model, config, params = arch
    convert.export(config, params, tmp_path, to="diffusers")
    exported = AutoencoderDC.from_pretrained(tmp_path).eval()  # strict: diffusers accepts config and tensors
    for key in cfg:  # what shapes cannot show (activations, norm kinds) must survive too
        assert _plain(exported.config[key]) == _plain(cfg[key]) or (
            isinstance(cfg[key], str) and set(_plain(exported.config[key])) == {cfg[key]}), key
    theirs, ours = model.state_dict(), exported.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs if not k.endswith("num_batches_tracked"))
    vae = flax_vae.load(tmp_path)
    assert vae.config == config and vae.config.family == "dcae"
    flat, loaded = convert.rules.flatten(params), convert.rules.flatten(vae.params)
    assert all(np.array_equal(flat[k], loaded[k]) for k in flat) and flat.keys() == loaded.keys()


def _plain(v):
    return [_plain(e) for e in v] if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("hub, name, size, seed", [("f32-sana", "dc-ae-f32c32-sana-1.0", 512, 3),
                                                    ("f32-lite", "dc-ae-lite-f32c32-sana-1.1", 256, 4)])
def test_full_f32c32(hub, name, size, seed):
    """A full f32c32 configuration from an MIT-layout file: the variant is recognised by names and shapes (lite
    shares sana's encoder), then parity with diffusers."""
    model = torch_model(HUB[hub], seed=seed)
    config, params = cdcae.from_mit(to_mit(state_dict(model), pixel_unshuffle=False), "mit")
    assert "/".join(cdcae.variant_names(config, f"weights/{name}/model.safetensors")) == name
    assert cdcae.with_released_scaling(config, [name]) == PRESETS[name]
    x = images(size, size)
    z_ref, y_ref = reference(model, x)
    vae = autoencoder(PRESETS[name], params)
    z, y = vae.encode(x), vae.decode(z_ref)
    assert max_abs_rel(z, z_ref) <= TOL and max_abs_rel(y, y_ref) <= TOL, (max_abs_rel(z, z_ref), max_abs_rel(y, y_ref))


def test_bfloat16_stays_close():
    """bf16 compute (float32 attention inside) at a size where every attention takes the linear form."""
    cfg = reduced(HUB["f32-sana"])
    config = cdcae.config_from_diffusers(cfg, "f32-sana")
    params = cdcae.from_diffusers(state_dict(torch_model(cfg)), config)
    x = images(*SIZES["f32-sana"][1])
    f32 = autoencoder(config, params)
    bf16 = flax_vae.Autoencoder(config=config, module=DCAE(config, dtype=jnp.bfloat16), params=params)
    z = f32.encode(x)
    assert max_abs_rel(bf16.encode(x), z) < 0.05
    assert max_abs_rel(bf16.decode(z), f32.decode(z)) < 0.05


def test_sizes_not_a_multiple_of_the_factor_are_refused(arch):
    name, cfg, model, config, params = arch
    h, w = SIZES[name][0]
    with pytest.raises(ValueError, match=f"multiples of {config.factor}"):
        autoencoder(config, params).encode(images(h, w + config.factor // 2))


def test_strict_loading_names_the_keys(arch):
    name, cfg, model, config, params = arch
    sd = state_dict(model)
    extra, missing, wrong = dict(sd), dict(sd), dict(sd)
    extra["decoder.extra.weight"] = np.zeros(1, np.float32)
    key = next(k for k in sd if k.endswith("attn.to_out.weight"))
    del missing[key]
    wrong[key] = wrong[key][:, :-1]
    for tensors, words in ((extra, "decoder.extra.weight"), (missing, key), (wrong, key)):
        with pytest.raises(CheckpointError, match=re.escape(words)):
            cdcae.from_diffusers(tensors, config, "ckpt")


def test_mit_file_dispatch(arch, tmp_path):
    """convert.load recognises an MIT-layout file; reduced widths are no released architecture: the error
    names a tensor whose shape differs from the closest released one."""
    name, cfg, model, config, params = arch
    path = tmp_path / "model.safetensors"
    convert.write_safetensors(path, to_mit(state_dict(model), config.downsample == "pixel_unshuffle"))
    with pytest.raises(CheckpointError, match=r"closest released architecture.*has shape"):
        convert.load(path)


def test_unsupported_diffusers_config_is_refused():
    with pytest.raises(CheckpointError, match="decoder_in_shortcut"):
        cdcae.config_from_diffusers({**HUB["f32-sana"], "decoder_in_shortcut": False}, "config.json")
    with pytest.raises(CheckpointError, match="LayerNorm|block type"):
        cdcae.config_from_diffusers({**HUB["f32-sana"], "encoder_block_types": "LayerNorm"}, "config.json")
    with pytest.raises(CheckpointError, match="upsample_block_type 'bilinear'"):
        cdcae.config_from_diffusers({**HUB["f32-lite"], "upsample_block_type": "bilinear"}, "config.json")
    with pytest.raises(CheckpointError, match="decoder_out_act.*gelu"):
        cdcae.config_from_diffusers({**HUB["f32-lite"], "decoder_conv_act_fn": "gelu"}, "config.json")
