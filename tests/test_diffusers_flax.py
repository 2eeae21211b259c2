"""diffusers' Flax AutoencoderKL (FlaxAutoencoderKL, diffusers <= 0.39) folders and in-memory trees.

The reference under tests/data/diffusers_flax/ was made with diffusers 0.39 itself (make_reference.py, in a separate
venv): a small FlaxAutoencoderKL's save_pretrained folder and outputs, and an SD 1.5-config's tree, seeded weights'
checksums and outputs.
"""
import dataclasses
import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import torch
from flax import serialization
from safetensors.numpy import save_file

import flax_vae
from flax_vae import family
from flax_vae.autoencoder import Autoencoder
from flax_vae.convert import CheckpointError, diffusers_flax, from_diffusers_flax, kl, to_diffusers_flax
from flax_vae.convert.rules import flatten, unflatten
from flax_vae.kl import PRESETS, KLConfig

from conftest import DATA, max_abs_rel, seeded_params

REF = DATA / "diffusers_flax"
MSGPACK = "diffusion_flax_model.msgpack"
needs_reference = pytest.mark.skipif(not (REF / "small_vae" / MSGPACK).is_file(), reason="no diffusers 0.39 reference")

SMALL = KLConfig(block_out_channels=(32, 64), layers_per_block=1)  # the reference's small_vae
CONFIGS = [SMALL, KLConfig(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=8,
                           norm_num_groups=16, scaling_factor=0.5),
           KLConfig(block_out_channels=(32,), layers_per_block=1, latent_channels=16)]


def documented_tree(c: KLConfig) -> dict:
    """{path: shape} of diffusers' FlaxAutoencoderKL for `c`, written from how vae_flax.py builds it (PORTING.md):
    lists of submodules are named `name_{i}`, up block 0 is the lowest resolution, quant convs sit at the top."""
    w, layers, z = c.block_out_channels, c.layers_per_block, c.latent_channels
    tree = {}

    def conv(p, k, cin, cout):
        tree.update({f"{p}/kernel": (k, k, cin, cout), f"{p}/bias": (cout,)})

    def norm(p, ch):
        tree.update({f"{p}/scale": (ch,), f"{p}/bias": (ch,)})

    def resnet(p, cin, cout):
        norm(f"{p}/norm1", cin), conv(f"{p}/conv1", 3, cin, cout), norm(f"{p}/norm2", cout)
        conv(f"{p}/conv2", 3, cout, cout)
        if cin != cout:
            conv(f"{p}/conv_shortcut", 1, cin, cout)

    def mid(p, ch):
        resnet(f"{p}/resnets_0", ch, ch)
        norm(f"{p}/attentions_0/group_norm", ch)
        for name in ("query", "key", "value", "proj_attn"):  # nn.Dense: (in, out) kernels
            tree.update({f"{p}/attentions_0/{name}/kernel": (ch, ch), f"{p}/attentions_0/{name}/bias": (ch,)})
        resnet(f"{p}/resnets_1", ch, ch)

    conv("encoder/conv_in", 3, 3, w[0])
    for i, (cin, cout) in enumerate(zip((w[0],) + w, w)):
        for j in range(layers):
            resnet(f"encoder/down_blocks_{i}/resnets_{j}", cin if j == 0 else cout, cout)
        if i < len(w) - 1:
            conv(f"encoder/down_blocks_{i}/downsamplers_0/conv", 3, cout, cout)
    mid("encoder/mid_block", w[-1])
    norm("encoder/conv_norm_out", w[-1]), conv("encoder/conv_out", 3, w[-1], 2 * z)
    conv("quant_conv", 1, 2 * z, 2 * z), conv("post_quant_conv", 1, z, z)
    r = w[::-1]
    conv("decoder/conv_in", 3, z, r[0])
    mid("decoder/mid_block", r[0])
    for i, (cin, cout) in enumerate(zip((r[0],) + r, r)):
        for j in range(layers + 1):
            resnet(f"decoder/up_blocks_{i}/resnets_{j}", cin if j == 0 else cout, cout)
        if i < len(r) - 1:
            conv(f"decoder/up_blocks_{i}/upsamplers_0/conv", 3, cout, cout)
    norm("decoder/conv_norm_out", w[0]), conv("decoder/conv_out", 3, w[0], 3)
    return tree


def random_params(config, seed=0, dtype=np.float32):
    """Random values of every parameter's shape (from param_shapes: no initialisers run), numpy."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32).astype(dtype),
                        family.param_shapes(config))


def shapes_of(tree):
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def assert_same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


def vae_of(config, params):
    return Autoencoder(config=config, module=family.module(config), params=jax.tree.map(jnp.asarray, params),
                       name="test")


def images(n=2, side=16, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, side, side, 3)).astype(np.float32)


# ---- the tree

@pytest.mark.parametrize("config", CONFIGS + [PRESETS["sd15"]], ids=["small", "three_stages", "one_stage", "sd15"])
def test_tree_is_the_documented_diffusers_structure(config):
    assert diffusers_flax.expected_shapes(config) == documented_tree(config)
    assert shapes_of(to_diffusers_flax(random_params(config), config)) == documented_tree(config)


@needs_reference
@pytest.mark.parametrize("tag", ["small", "sd15"])
def test_tree_equals_diffusers_0_39s_init_weights(tag):
    facts = json.loads((REF / f"{tag}_facts.json").read_text())
    config = kl.config_from_diffusers(dict(facts["config"], _class_name="AutoencoderKL"), tag)
    assert config == (SMALL if tag == "small" else PRESETS["sd15"])
    assert diffusers_flax.expected_shapes(config) == {k: tuple(v) for k, v in facts["paths_shapes"].items()}


def test_round_trip_sd15_is_bit_exact_and_copies_nothing():
    config = PRESETS["sd15"]
    params = random_params(config)
    tree = to_diffusers_flax(params, config)
    back = from_diffusers_flax(tree, config)
    assert_same(back, params)
    assert {id(v) for v in flatten(tree).values()} == {id(v) for v in flatten(params).values()}  # moved, not copied
    assert_same(to_diffusers_flax(back, config), tree)


@pytest.mark.parametrize("config", CONFIGS, ids=["small", "three_stages", "one_stage"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_round_trip_small_configs_keeps_values_and_dtypes(config, dtype):
    params = random_params(config, seed=1, dtype=dtype)
    assert_same(from_diffusers_flax(to_diffusers_flax(params, config), config), params)
    jax_params = jax.tree.map(jnp.asarray, params)  # jax leaves as well as numpy
    assert_same(from_diffusers_flax(to_diffusers_flax(jax_params, config), config), params)


def test_converters_under_jit_are_pure_restructuring():
    config = CONFIGS[1]
    params = jax.tree.map(jnp.asarray, random_params(config, seed=2))
    to = jax.jit(functools.partial(to_diffusers_flax, config=config))
    back = jax.jit(functools.partial(from_diffusers_flax, config=config))
    tree = to(params)
    assert_same(tree, to_diffusers_flax(params, config))
    assert_same(back(tree), params)
    # nothing computed: the traced programs hold no operations at all
    assert not jax.make_jaxpr(functools.partial(to_diffusers_flax, config=config))(params).jaxpr.eqns
    assert not jax.make_jaxpr(functools.partial(from_diffusers_flax, config=config))(tree).jaxpr.eqns


def test_in_memory_converters_are_strict():
    config = SMALL
    params = random_params(config)
    tree = to_diffusers_flax(params, config)
    flat = flatten(tree)

    def refused(t, match, convert=from_diffusers_flax, c=config):
        with pytest.raises(CheckpointError, match=match) as e:
            convert(t, c)
        assert "\n" not in str(e.value)

    refused(unflatten({k: v for k, v in flat.items() if k != "quant_conv/bias"}), "missing keys: quant_conv/bias")
    refused(unflatten(dict(flat, **{"encoder/extra/kernel": flat["quant_conv/bias"]})),
            "unexpected keys: encoder/extra/kernel")
    refused(unflatten(dict(flat, **{"quant_conv/bias": np.zeros(7, np.float32)})),
            r"quant_conv/bias has shape \(7,\) but encoder/quant_conv/bias needs \(8,\)")
    refused(unflatten(dict(flat, **{"quant_conv/bias": "text"})), "quant_conv/bias is a str, not an array")
    refused(unflatten(dict(flat, **{"quant_conv/bias": np.zeros(8, np.int32)})),
            "quant_conv/bias is an array of int32, not of floats")
    refused([1, 2], "expected a tree of parameters")
    refused(tree, "layers_per_block|missing keys", c=dataclasses.replace(config, layers_per_block=2))
    refused({"decoder": params["decoder"]}, "missing keys: encoder/", convert=to_diffusers_flax)
    flux2 = KLConfig(block_out_channels=(32, 64), layers_per_block=1, latent_batch_norm=True, scaling_factor=1.0)
    refused(tree, "BatchNorm", c=flux2)
    refused(tree, "AutoencoderKL models only", c=family.FAMILIES["taesd"].PRESETS["taesd"])


# ---- folders

def test_save_load_folder_is_bit_exact_and_gives_the_same_outputs(tmp_path):
    config = dataclasses.replace(CONFIGS[1], shift_factor=0.25)
    params = random_params(config, seed=3)
    vae = vae_of(config, params)
    flax_vae.save(vae, tmp_path / "vae", to="diffusers-flax")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", MSGPACK]
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "FlaxAutoencoderKL" and cfg["_diffusers_version"] == "0.39.0"
    # the msgpack is flax.serialization's msgpack of diffusers' tree
    stored = serialization.msgpack_restore((tmp_path / "vae" / MSGPACK).read_bytes())
    assert_same(stored, to_diffusers_flax(jax.tree.map(np.asarray, params), config))

    loaded = flax_vae.load(tmp_path / "vae")
    assert loaded.config == config
    assert_same(jax.tree.map(np.asarray, loaded.params), jax.tree.map(np.asarray, params))
    x = images()
    for a, b in zip(vae.posterior(x), loaded.posterior(x)):
        assert np.array_equal(a, b)
    z = vae.encode(x)
    assert np.array_equal(vae.decode(z), loaded.decode(z))


def test_written_config_is_what_diffusers_0_39_writes(tmp_path):
    flax_vae.save(vae_of(SMALL, random_params(SMALL)), tmp_path / "vae", to="diffusers-flax")
    ours = json.loads((tmp_path / "vae" / "config.json").read_text())
    if (REF / "small_vae" / "config.json").is_file():  # save_pretrained's, but for sample_size (unused by us)
        theirs = json.loads((REF / "small_vae" / "config.json").read_text())
        assert {k: v for k, v in ours.items() if k != "sample_size"} == \
            {k: v for k, v in theirs.items() if k != "sample_size"}
    else:
        assert set(ours) == {"_class_name", "_diffusers_version", "in_channels", "out_channels", "down_block_types",
                             "up_block_types", "block_out_channels", "layers_per_block", "act_fn",
                             "latent_channels", "norm_num_groups", "sample_size", "scaling_factor"}


@pytest.mark.parametrize("change, match", [
    (dict(use_quant_conv=False, use_post_quant_conv=False), "no quant convs"),
    (dict(mid_block_attention=False), "no mid-block attention"),
    (dict(decoder_block_out_channels=(64, 64)), "separate decoder widths"),
    (dict(latent_batch_norm=True, scaling_factor=1.0), "BatchNorm"),
])
def test_export_refuses_what_flax_autoencoder_kl_cannot_build(tmp_path, change, match):
    config = dataclasses.replace(SMALL, **change)
    params = random_params(config) if not config.latent_batch_norm else dict(  # (too small to init FLUX.2's)
        random_params(SMALL), latent_norm={"mean": np.zeros(16, np.float32), "var": np.ones(16, np.float32)})
    with pytest.raises(CheckpointError, match=match):
        flax_vae.save(vae_of(config, params), tmp_path / "vae", to="diffusers-flax")
    assert not (tmp_path / "vae").exists() and not list(tmp_path.iterdir())


def test_export_refuses_other_families(tmp_path):
    taesd = flax_vae.load("taesd")
    with pytest.raises(CheckpointError, match="AutoencoderKL models only"):
        flax_vae.save(taesd, tmp_path / "vae", to="diffusers-flax")


def write_folder(folder, config, params, files=("msgpack",), class_name="FlaxAutoencoderKL"):
    """A diffusers folder holding the given weight files of the same model: msgpack, safetensors, bin."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = diffusers_flax.diffusers_config(config) if class_name == "FlaxAutoencoderKL" else \
        dict(kl.diffusers_config(config), _class_name=class_name)
    (folder / "config.json").write_text(json.dumps(cfg))
    _, tensors = kl.diffusers_export(config, params)
    if "msgpack" in files:
        (folder / MSGPACK).write_bytes(serialization.msgpack_serialize(to_diffusers_flax(params, config)))
    if "safetensors" in files:
        save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    if "bin" in files:
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "diffusion_pytorch_model.bin")
    return folder


@pytest.mark.parametrize("present, used", [
    (("msgpack", "safetensors"), "safetensors"), (("msgpack", "bin"), "msgpack"), (("bin",), "bin"),
    (("msgpack",), "msgpack")])
def test_weights_preference_safetensors_then_msgpack_then_bin(tmp_path, present, used):
    values = {kind: random_params(SMALL, seed=i) for i, kind in enumerate(("msgpack", "safetensors", "bin"))}
    folder = tmp_path / "vae"
    for kind in present:  # each file with its own values, to tell which one was read
        write_folder(folder, SMALL, values[kind], files=(kind,))
    config, params, _ = flax_vae.convert.load(folder)
    assert config == SMALL
    assert_same(params, values[used])


def test_msgpack_with_the_pytorch_class_name_loads(tmp_path):
    """Folders converted from PyTorch (the hub's Flax branches) keep `_class_name` "AutoencoderKL"."""
    params = random_params(SMALL)
    folder = write_folder(tmp_path / "vae", SMALL, params, class_name="AutoencoderKL")
    config, loaded, _ = flax_vae.convert.load(folder)
    assert config == SMALL
    assert_same(loaded, params)


def test_msgpack_of_a_model_without_a_flax_class_is_refused(tmp_path):
    config = KLConfig(block_out_channels=(32, 64), layers_per_block=1, latent_batch_norm=True, scaling_factor=1.0)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(kl.diffusers_config(config)))
    (folder / MSGPACK).write_bytes(serialization.msgpack_serialize(to_diffusers_flax(random_params(SMALL), SMALL)))
    with pytest.raises(CheckpointError, match="FlaxAutoencoderKL weights only"):
        flax_vae.convert.load(folder)


def _bytes_of(tree):
    return serialization.msgpack_serialize(tree)


def _corruptions(good: bytes, tree: dict):
    flat = flatten(tree)
    edit = lambda **kv: _bytes_of(unflatten(dict(flat, **kv)))
    bad_ext = msgpack.packb({"quant_conv": {"bias": msgpack.ExtType(1, msgpack.packb(((8,), "float32", b"x" * 5)))}})
    return {
        "empty": (b"", "not a readable Flax msgpack"),
        "truncated": (good[: len(good) // 2], "not a readable Flax msgpack"),
        "one_byte_short": (good[:-1], "not a readable Flax msgpack"),
        "garbage": (b"\xc1" * 64, "not a readable Flax msgpack"),
        "trailing_bytes": (good + b"\x00", "not a readable Flax msgpack"),
        "bad_array_buffer": (bad_ext, "not a readable Flax msgpack"),
        "bad_dtype_name": (msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((1,), "nonsense", b"x")))}),
                           "not a readable Flax msgpack"),
        "a_list": (msgpack.packb([1, 2, 3]), "expected a tree of parameters"),
        "a_number": (msgpack.packb(3), "expected a tree of parameters"),
        "string_leaf": (edit(**{"quant_conv/bias": "eight"}), "quant_conv/bias is a str, not an array"),
        "string_array_leaf": (edit(**{"quant_conv/bias": np.array(["a"] * 8)}),  # flax cannot read its own
                              "not a readable Flax msgpack file .*data type 'str32' not understood"),
        "bool_array_leaf": (edit(**{"quant_conv/bias": np.ones(8, bool)}), "array of bool, not of floats"),
        "int_leaf": (edit(**{"quant_conv/bias": np.zeros(8, np.int64)}), "array of int64, not of floats"),
        "none_leaf": (edit(**{"quant_conv/bias": None}), "quant_conv/bias is a NoneType, not an array"),
        "wrong_shape": (edit(**{"quant_conv/kernel": np.zeros((1, 1, 8, 4), np.float32)}),
                        r"quant_conv/kernel has shape \(1, 1, 8, 4\) but encoder/quant_conv/kernel needs"),
        "missing_key": (_bytes_of(unflatten({k: v for k, v in flat.items() if not k.startswith("decoder/up_")})),
                        "missing keys: decoder/up_blocks_0/"),
        "extra_key": (edit(**{"encoder/mid_block/attentions_1/query/kernel": flat["quant_conv/bias"]}),
                      "unexpected keys: encoder/mid_block/attentions_1/query/kernel"),
        "pytorch_names": (_bytes_of({k.replace("/", "."): v for k, v in flat.items()}), "unexpected keys"),
        "wrapped_in_params": (_bytes_of({"params": tree}), "unexpected keys: params/"),
    }


CORRUPTIONS = ["empty", "truncated", "one_byte_short", "garbage", "trailing_bytes", "bad_array_buffer",
               "bad_dtype_name", "a_list", "a_number", "string_leaf", "string_array_leaf", "bool_array_leaf",
               "int_leaf", "none_leaf", "wrong_shape", "missing_key", "extra_key", "pytorch_names",
               "wrapped_in_params"]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_or_mismatched_msgpack_is_one_checkpoint_error(tmp_path, case):
    params = random_params(SMALL)
    tree = to_diffusers_flax(params, SMALL)
    folder = write_folder(tmp_path / "vae", SMALL, params)
    cases = _corruptions((folder / MSGPACK).read_bytes(), tree)
    assert list(cases) == CORRUPTIONS
    data, match = cases[case]
    (folder / MSGPACK).write_bytes(data)
    with pytest.raises(CheckpointError, match=match) as e:
        flax_vae.load(folder)
    message = str(e.value)
    assert "\n" not in message and str(folder / MSGPACK) in message, message


def test_config_that_does_not_match_the_msgpack(tmp_path):
    folder = write_folder(tmp_path / "vae", SMALL, random_params(SMALL))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, layers_per_block=2)))
    with pytest.raises(CheckpointError, match=f"{folder / MSGPACK}: does not match the model: .*missing keys"):
        flax_vae.load(folder)
    (folder / "config.json").write_text(json.dumps(dict(cfg, latent_channels=8)))
    with pytest.raises(CheckpointError, match="has shape .* but .* needs"):
        flax_vae.load(folder)


def test_unreadable_msgpack_file(tmp_path):
    folder = write_folder(tmp_path / "vae", SMALL, random_params(SMALL))
    (folder / MSGPACK).unlink()
    (folder / MSGPACK).mkdir()  # a folder where the file should be: not taken as weights
    with pytest.raises(CheckpointError, match="no weights file"):
        flax_vae.load(folder)
    with pytest.raises(CheckpointError, match="unreadable"):
        diffusers_flax.read_msgpack(folder / MSGPACK)


# ---- diffusers 0.39's own outputs

def reference_inputs():
    crops = np.load(REF / "inputs.npz")
    x1 = crops["astronaut_crop_hwc_uint8"][None]
    x2 = np.stack([crops["astronaut_crop_hwc_uint8"], crops["coffee_crop_hwc_uint8"]])
    to_float = lambda a: a.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return to_float(x1), to_float(x2)  # NHWC here; diffusers took them NCHW


def assert_outputs_match(vae, outputs, batches=("1", "2")):
    x1, x2 = reference_inputs()
    for tag, x in (("1", x1), ("2", x2)):
        if tag not in batches:
            continue
        mean, logvar = vae.posterior(x)  # diffusers' latent_dist: NHWC (split on the last axis), logvar clipped
        assert max_abs_rel(mean, outputs[f"enc{tag}_mean"]) < 1e-5
        assert max_abs_rel(logvar, outputs[f"enc{tag}_logvar"]) < 1e-5
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # diffusers' decode returns NCHW
    assert max_abs_rel(nchw(vae.decode(outputs["enc1_mean"])), outputs["dec1_from_nhwc_mean"]) < 1e-5
    if "2" in batches:
        assert max_abs_rel(nchw(vae.decode(outputs["enc2_sample_key0"])), outputs["dec2_from_nhwc_sample_key0"]) < 1e-5


@needs_reference
def test_reference_small_folder_loads_and_matches_diffusers_outputs(tmp_path):
    vae = flax_vae.load(REF / "small_vae")
    assert vae.config == SMALL
    stored = serialization.msgpack_restore((REF / "small_vae" / MSGPACK).read_bytes())
    assert_same(jax.tree.map(np.asarray, vae.params), from_diffusers_flax(stored, SMALL))
    assert_outputs_match(vae, np.load(REF / "small_outputs.npz"))
    # and written back, the same tree, bit for bit
    flax_vae.save(vae, tmp_path / "again", to="diffusers-flax")
    assert_same(serialization.msgpack_restore((tmp_path / "again" / MSGPACK).read_bytes()), stored)


@needs_reference
def test_reference_sd15_outputs():
    facts = json.loads((REF / "sd15_facts.json").read_text())
    with pytest.raises(CheckpointError, match="no weights file"):  # save_config only: a config without weights
        flax_vae.load(REF / "sd15_vae")
    config = kl.config_from_diffusers(
        dict(json.loads((REF / "sd15_vae" / "config.json").read_text()), _class_name="AutoencoderKL"), "sd15")
    assert config == PRESETS["sd15"]
    flat = seeded_params(diffusers_flax.expected_shapes(config), facts["seed"])
    stats = facts["seeded_params_leaf_stats"]
    assert flat.keys() == stats.keys()
    for k, v in flat.items():  # the weights tests/test_diffusers_compat.py checks the SD 1.5 outputs with
        assert hashlib.sha256(v.tobytes()).hexdigest() == stats[k]["sha256"], k
