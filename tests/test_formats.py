"""Loading every TAESD format, strictness, corrupt files, and export (flax-vae, diffusers, madebyollin)."""
import hashlib
import json
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import DATA

from flax_vae import convert
import flax_vae
from flax_vae.convert.checkpoint import CheckpointError, read_tensors, write_safetensors
from flax_vae.loading import BUNDLED, WEIGHTS_DIR

X = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)


def same_params(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


# ---- the bundled weights are the published files

COMFYUI_SHA256 = {  # ../shared/weights/SOURCES.md
    "taesd_encoder": "a6b8c0fda4aad50784e543389e0239c72c5e31e9775c9e612ea8333bf3a77dcb",
    "taesd_decoder": "d903e7cc3ae58f21d985a3498a841fa8b230edccff7ac5d27607b0c557945c6f",
    "taesdxl_encoder": "3d78013286676a1a51074831230f90972e573698fe4b11416d6f28e0cd5bbe7e",
    "taesdxl_decoder": "ae5256b046b01d577279ed93a55bbb1fb2689e55aa14cfc0f7f841e0160202a5",
    "taesd3_encoder": "e5c96f3476bd26fe73e96d701a694f40d7ab48a290494cbbf70a3697d09cab4a",
    "taesd3_decoder": "e940e227e2a41919f0735ec423129724666f8b949c8bbce7a04b78ecfb4667de",
    "taef1_encoder": "19f5a854ce575fd0a1c0a52938410cf5fb4dc4b8ae71c8887533646d8fe47030",
    "taef1_decoder": "bb41500b646d5b8b592b7f3ca5d20d888c3075e209d178d99af609cd7e02a1d4",
}


@pytest.mark.parametrize("stem", sorted(COMFYUI_SHA256))
def test_bundled_safetensors_are_the_published_files(stem):
    assert hashlib.sha256((WEIGHTS_DIR / f"{stem}.safetensors").read_bytes()).hexdigest() == COMFYUI_SHA256[stem]


@pytest.mark.parametrize("stem", ["taef2_encoder", "taef2_decoder", "taesana_encoder"])
def test_bundled_safetensors_hold_exactly_the_original_pth(stem):
    original = read_tensors(DATA / f"{stem}.pth")
    bundled = read_tensors(WEIGHTS_DIR / f"{stem}.safetensors")
    assert original.keys() == bundled.keys()
    assert all(original[k].dtype == np.float16 and np.array_equal(original[k], bundled[k]) for k in original)


# ---- formats and detection

def test_pth_pair_loads_like_bundled():
    a = flax_vae.load(encoder=DATA / "taef2_encoder.pth", decoder=DATA / "taef2_decoder.pth")
    b = flax_vae.load("taef2")
    assert a.config == b.config and same_params(a.params, b.params)
    assert a.name == "taef2"  # from the file names, which agree with the shapes


def test_variant_detected_from_shapes_not_names(tmp_path):
    for name, (enc, dec) in BUNDLED.items():
        shutil.copy(WEIGHTS_DIR / enc, tmp_path / f"{name}_a.safetensors")
        config, params, _ = convert.load(tmp_path / f"{name}_a.safetensors")
        assert config == flax_vae.TAESD_PRESETS[name] and list(params) == ["encoder"]
    shutil.copy(WEIGHTS_DIR / "taef2_decoder.safetensors", tmp_path / "mystery.safetensors")
    config, params, name = convert.load(tmp_path / "mystery.safetensors")
    assert config.midblock_gn and config.latent_channels == 32 and list(params) == ["decoder"]
    assert name == "taef2"  # the only preset with this architecture
    shutil.copy(WEIGHTS_DIR / "taesd3_encoder.safetensors", tmp_path / "x.safetensors")
    assert convert.load(tmp_path / "x.safetensors")[2] == "taesd3/taef1"  # same architecture, name unknown


def test_folder_of_pair_files(tmp_path):
    for f in BUNDLED["taesd3"]:
        shutil.copy(WEIGHTS_DIR / f, tmp_path / f)
    vae = flax_vae.load(tmp_path)
    assert vae.name == "taesd3" and set(vae.params) == {"encoder", "decoder"}


def test_encoder_and_decoder_that_do_not_belong_together():
    with pytest.raises(CheckpointError, match="do not belong together"):
        flax_vae.load(encoder=WEIGHTS_DIR / "taesd_encoder.safetensors",
                      decoder=WEIGHTS_DIR / "taef1_decoder.safetensors")
    with pytest.raises(CheckpointError, match="holds a TAESD decoder"):
        flax_vae.load(encoder=WEIGHTS_DIR / "taesd_decoder.safetensors")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_half_precision_checkpoints_load_into_requested_dtype(dtype):
    vae = flax_vae.load("taesd", dtype=dtype)  # stored as bfloat16
    assert {a.dtype for a in jax.tree.leaves(vae.params)} == {jnp.dtype(dtype)}
    assert vae.decode(vae.encode(X)).dtype == dtype


# ---- strictness and bad files

def test_unknown_missing_and_misshaped_keys_are_named(tmp_path):
    tensors = read_tensors(WEIGHTS_DIR / "taesd_encoder.safetensors")
    write_safetensors(tmp_path / "extra_encoder.safetensors", {**tensors, "1.conv.9.weight": tensors["0.bias"]})
    with pytest.raises(CheckpointError, match=r"unexpected keys: 1\.conv\.9\.weight"):
        flax_vae.load(tmp_path / "extra_encoder.safetensors")
    del tensors["5.conv.2.bias"]
    write_safetensors(tmp_path / "missing_encoder.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"missing keys: 5\.conv\.2\.bias"):
        flax_vae.load(tmp_path / "missing_encoder.safetensors")
    tensors = read_tensors(WEIGHTS_DIR / "taesd_encoder.safetensors")
    tensors["3.conv.2.weight"] = tensors["3.conv.2.weight"][:, :32]
    write_safetensors(tmp_path / "shape_encoder.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"3\.conv\.2\.weight has shape \(64, 32, 3, 3\) but "
                                              r"encoder/blocks_0_0/conv_1/kernel needs \(64, 64, 3, 3\)"):
        flax_vae.load(tmp_path / "shape_encoder.safetensors")


def test_truncated_and_corrupt_files(tmp_path):
    data = (WEIGHTS_DIR / "taesd_encoder.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a checkpoint" * 10)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for f in ("trunc", "garbage", "empty"):
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            flax_vae.load(tmp_path / f"{f}.safetensors")
    pth = (DATA / "taef2_encoder.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(pth[: len(pth) // 2])
    with pytest.raises(CheckpointError, match="refused or unreadable PyTorch file"):
        flax_vae.load(tmp_path / "trunc.pth")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        flax_vae.load(DATA / "taesana_layout_decoder_random_io.npz")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        flax_vae.load(tmp_path / "nothing_here")


class Payload:
    """Unpickling this would create a file: the proof that nothing was executed."""
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pth_with_pickled_object_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    Payload.marker = marker
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"0.weight": Payload()}, f)
    torch.save({"0.weight": torch.zeros(1), "callback": Payload()}, tmp_path / "evil_zip.pth")
    for f in ("evil.pth", "evil_zip.pth"):
        with pytest.raises(CheckpointError, match="never unpickled"):
            flax_vae.load(tmp_path / f)
    assert not marker.exists()
    assert zipfile.is_zipfile(tmp_path / "evil_zip.pth")


# ---- export and reload

def test_save_load_roundtrip_is_bit_identical(tmp_path):
    for name, dtype in (("taef2", jnp.float32), ("taesd", jnp.bfloat16), ("taesana", jnp.float16)):
        vae = flax_vae.load(name, dtype=dtype)
        flax_vae.save(vae, tmp_path / name)
        back = flax_vae.load(tmp_path / name, dtype=dtype)
        assert back.config == vae.config and back.name == name and same_params(back.params, vae.params)
        assert np.array_equal(np.asarray(back.encode(X)), np.asarray(vae.encode(X)))
    stored = read_tensors(tmp_path / "taesd" / "params.safetensors")  # the dtype is kept on disk
    assert {a.dtype for a in stored.values()} == {jnp.dtype(jnp.bfloat16)}


def test_export_to_diffusers_loads_in_diffusers(tmp_path):
    from diffusers import AutoencoderTiny
    vae = flax_vae.load("taesd3")
    flax_vae.save(vae, tmp_path / "d", to="diffusers")
    ref = AutoencoderTiny.from_pretrained(tmp_path / "d").eval()
    with torch.no_grad():
        z = ref.encode(torch.from_numpy(X.transpose(0, 3, 1, 2).copy())).latents.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(vae.encode(X)), z, atol=1e-4)
    back = flax_vae.load(tmp_path / "d")  # and reads back through the diffusers-folder path
    assert back.config == vae.config and same_params(back.params, vae.params)


def test_torch_to_flax_to_torch_is_bit_identical(tmp_path):
    flax_vae.save(flax_vae.load(encoder=DATA / "taef2_encoder.pth", dtype=jnp.float16), tmp_path, to="madebyollin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taef2_encoder.safetensors"]
    original, exported = read_tensors(DATA / "taef2_encoder.pth"), read_tensors(tmp_path / "taef2_encoder.safetensors")
    assert original.keys() == exported.keys()
    assert all(original[k].dtype == exported[k].dtype and np.array_equal(original[k], exported[k]) for k in original)


def test_layouts_diffusers_cannot_express_are_refused_clearly(tmp_path):
    for name, why in (("taef2", "mid-block GroupNorm"), ("taesana", "32x layout")):
        with pytest.raises(CheckpointError, match=f"cannot express the {why}.*--to madebyollin"):
            flax_vae.save(flax_vae.load(name), tmp_path / name, to="diffusers")
        assert not (tmp_path / name).exists()


# ---- config.json: every field checked on load, one line naming the field

def _small(family_name):
    from flax_vae.testing import CONFIGS, random_params
    config = CONFIGS[f"{family_name}-small"]
    return flax_vae.Autoencoder(config, flax_vae.family.module(config), random_params(config), "small")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(family, format): folder} of small models."""
    root, out = tmp_path_factory.mktemp("configs"), {}
    for name, vae in (("taesd", flax_vae.load("taesd")), ("kl", _small("kl")), ("dcae", _small("dcae"))):
        for to in ("diffusers", "flax"):
            flax_vae.save(vae, root / f"{name}-{to}", to=to)
            out[name, to] = root / f"{name}-{to}"
    return out


@pytest.mark.parametrize("family_name,to,field,value", [
    ("taesd", "diffusers", "latent_channels", "four"),
    ("taesd", "diffusers", "scaling_factor", None),
    ("taesd", "diffusers", "num_encoder_blocks", 3),
    ("taesd", "flax", "latent_channels", "four"),
    ("taesd", "flax", "width", 10**12),
    ("taesd", "flax", "scaling_factor", float("nan")),
    ("taesd", "flax", "midblock_gn", "yes"),
    ("kl", "diffusers", "block_out_channels", 7),
    ("kl", "diffusers", "latent_channels", -3),
    ("kl", "diffusers", "layers_per_block", float("inf")),
    ("kl", "flax", "norm_num_groups", 2.5),
    ("kl", "flax", "latents_mean", [1, "x"]),
    ("dcae", "diffusers", "encoder_block_out_channels", {"a": 1}),
    ("dcae", "diffusers", "attention_head_dim", "32"),
    ("dcae", "flax", "encoder_depths", [1, 1, 1, 1, 1, None]),
])
def test_bad_config_fields_are_named_in_one_line(saved, tmp_path, family_name, to, field, value):
    folder = tmp_path / "m"
    shutil.copytree(saved[family_name, to], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (cfg["config"] if to == "flax" else cfg)[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        flax_vae.load(folder)
    assert field in str(e.value) and str(folder) in str(e.value) and "\n" not in str(e.value)


def test_missing_config_fields_take_the_defaults(saved, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(saved["kl", "diffusers"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["scaling_factor"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert flax_vae.load(folder).config.scaling_factor == flax_vae.KLConfig().scaling_factor
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        flax_vae.load(folder)


# ---- writing into folders: never into a non-empty one by accident, and never a mix of old and new files

def test_save_refuses_a_non_empty_folder_and_overwrite_replaces_it_whole(tmp_path):
    out = tmp_path / "out"
    flax_vae.save(flax_vae.load("taef2"), out, to="madebyollin")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(CheckpointError, match="not empty.*overwrite"):
        flax_vae.save(flax_vae.load("taesd"), out, to="madebyollin")
    assert sorted(p.name for p in out.iterdir()) == before  # untouched
    flax_vae.save(flax_vae.load("taesd"), out, to="flax", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors"]  # no stale files
    assert flax_vae.load(out).name == "taesd"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left beside it


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    flax_vae.save(flax_vae.load("taesd"), out)
    with pytest.raises(CheckpointError, match="madebyollin format holds TAESD models only"):
        flax_vae.save(_small("kl"), out, to="madebyollin", overwrite=True)
    assert flax_vae.load(out).name == "taesd" and [p.name for p in tmp_path.iterdir()] == ["out"]
