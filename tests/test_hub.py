"""Hub ids wherever a path is accepted (flax_vae.hub): each form loads what the local folder loads, downloading only
config.json and one weights file; revisions, variants, offline mode, tokens; one-line errors naming the fix; a local
path wins; the command line's --model / SRC, repo:subfolder, --subfolder, --revision, --variant. Against
tests/hub_server.py on 127.0.0.1 (no network), with a fresh huggingface_hub cache per test."""
import dataclasses
import importlib
import json
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_vae.convert import kl as convert_kl
from flax_vae.convert import write_safetensors
from flax_vae.convert.rules import from_flax
from hub_server import TOKEN, HubServer, folder_files
from PIL import Image

import flax_vae
from flax_vae import cli, family, hub, testing
from flax_vae.autoencoder import Autoencoder
from flax_vae.kl import KLConfig

LDM_CONFIG = KLConfig(block_out_channels=(32, 32), layers_per_block=1)  # an LDM file's widths tell GroupNorm's 32
FP16 = "diffusion_pytorch_model.fp16.safetensors"
JUNK = b"never downloaded"
DIFFUSERS_FLAX = Path(__file__).parent / "data" / "diffusers_flax" / "small_vae"  # made by diffusers 0.39  # the files next to the chosen ones: a download of one fails the test


def random_model(config, seed=0, name="custom"):
    return Autoencoder(config=config, module=family.module(config), params=testing.random_params(config, seed),
                       name=name)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The models as local folders and files: what each Hub repository's load must equal."""
    root = tmp_path_factory.mktemp("models")
    taesd = flax_vae.load("taesd")
    flax_vae.save(taesd, root / "taesd-diffusers", to="diffusers")
    flax_vae.save(taesd, root / "taesd-flax")
    flax_vae.save(flax_vae.load("taesdxl"), root / "taesdxl-pair", to="madebyollin")
    for seed, name in ((0, "kl"), (1, "kl-v2"), (2, "flux-vae"), (4, "gated-vae")):
        flax_vae.save(random_model(testing.CONFIGS["kl-small"], seed), root / name, to="diffusers")
    half = random_model(testing.CONFIGS["kl-small"], 3)
    half = dataclasses.replace(half, params=jax.tree.map(lambda a: np.asarray(a, np.float16), half.params))
    flax_vae.save(half, root / "kl-fp16", to="diffusers")  # stored as float16
    flax_vae.save(random_model(testing.CONFIGS["dcae-small"]), root / "dcae-diffusers", to="diffusers")
    ldm = random_model(LDM_CONFIG, 5)
    (root / "ldm").mkdir()
    write_safetensors(root / "ldm" / "vae-ft-mse-840000-ema-pruned.safetensors",
                      from_flax(ldm.params, convert_kl.rules(LDM_CONFIG, ldm=True, parts=tuple(ldm.params))))
    return root


@pytest.fixture(scope="module")
def server(local):
    s = HubServer().start()
    files = dict(folder_files(local / "taesd-diffusers"), **{
        "taesd_encoder.safetensors": (flax_vae.loading.WEIGHTS_DIR / "taesd_encoder.safetensors").read_bytes(),
        "taesd_decoder.safetensors": (flax_vae.loading.WEIGHTS_DIR / "taesd_decoder.safetensors").read_bytes(),
        "taesd_encoder.pth": JUNK, "taesd_decoder.pth": JUNK, "diffusion_pytorch_model.bin": JUNK,
        "README.md": b"# TAESD\n", ".gitattributes": b"*.safetensors filter=lfs\n"})
    s.add("madebyollin/taesd", files)
    s.add("madebyollin/taesdxl", dict(folder_files(local / "taesdxl-pair"), **{"taesdxl_encoder.pth": JUNK}))
    kl = dict(folder_files(local / "kl"), **{FP16: (local / "kl-fp16" / "diffusion_pytorch_model.safetensors")
                                              .read_bytes(), "diffusion_pytorch_model.bin": JUNK})
    s.add("stabilityai/sd-vae-ft-mse", kl)
    s.v2 = s.add("stabilityai/sd-vae-ft-mse", folder_files(local / "kl-v2"), revision="v2")
    pipeline = {"model_index.json": b'{"_class_name": "FluxPipeline"}',
                "transformer/config.json": b'{"_class_name": "FluxTransformer2DModel"}',
                "transformer/diffusion_pytorch_model.safetensors": JUNK}
    s.add("black-forest-labs/FLUX.1-schnell", dict(pipeline, **folder_files(local / "flux-vae", "vae")))
    s.add("black-forest-labs/FLUX.1-dev", dict(pipeline, **folder_files(local / "gated-vae", "vae")), gated=True)
    s.add("stabilityai/sd-vae-ft-mse-original", dict(folder_files(local / "ldm"), **{
        "vae-ft-mse-840000-ema-pruned.ckpt": JUNK}))
    s.add("mit-han-lab/dc-ae-f32c32-sana-1.0", {  # PyTorchModelHubMixin: a config.json that is not diffusers'
        "config.json": b'{"model_name": "dc-ae-f32c32-sana-1.0"}', "model.safetensors": JUNK + b" (MIT layout)"})
    s.add("mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers", folder_files(local / "dcae-diffusers"))
    s.add("someone/taesd-flax", folder_files(local / "taesd-flax"))
    s.add("someone/private-vae", folder_files(local / "kl"), private=True)
    s.add("pcuenq/sd-vae-ft-mse-flax", dict(folder_files(DIFFUSERS_FLAX), **{"diffusion_pytorch_model.bin": JUNK}))
    s.add("someone/no-weights", {"README.md": b"soon\n", "notes.txt": b"weights to come\n"})
    yield s
    s.stop()


@pytest.fixture
def hf(server, monkeypatch, tmp_path):
    """huggingface_hub pointed at the test server with an empty cache in tmp_path (its constants are read at
    import, so they are patched as well as the environment); no token, online."""
    from huggingface_hub import constants
    home = tmp_path / "hf"
    for key, value in dict(HF_ENDPOINT=server.endpoint, HF_HOME=home, HF_HUB_CACHE=home / "hub",
                           HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1").items():
        monkeypatch.setenv(key, str(value))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
                "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(ENDPOINT=server.endpoint, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"),
                           HUGGINGFACE_CO_URL_TEMPLATE=server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
                           HF_HUB_OFFLINE=False, HF_HUB_DISABLE_TELEMETRY=True, HF_TOKEN_PATH=str(home / "token"),
                           HF_STORED_TOKENS_PATH=str(home / "stored_tokens")).items():
        assert hasattr(constants, key), key
        monkeypatch.setattr(constants, key, value)
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", True)
    with server.lock:
        server.downloads.clear()
        server.requests.clear()
    return server


def offline(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def assert_same(vae, expected):
    assert vae.config == expected.config
    a, b = jax.tree.flatten_with_path(vae.params)[0], jax.tree.flatten_with_path(expected.params)[0]
    assert [p for p, _ in a] == [p for p, _ in b]
    assert all(x.dtype == y.dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))


def one_line(e) -> str:
    message = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in message, message
    return message


IMAGE = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)


# each form, what it downloads

@pytest.mark.parametrize("source, options, expected, downloads", [
    ("madebyollin/taesd", {}, "taesd-diffusers", ["config.json", "diffusion_pytorch_model.safetensors"]),
    ("madebyollin/taesdxl", {}, "taesdxl-pair", ["taesdxl_decoder.safetensors", "taesdxl_encoder.safetensors"]),
    ("stabilityai/sd-vae-ft-mse", {}, "kl", ["config.json", "diffusion_pytorch_model.safetensors"]),
    ("black-forest-labs/FLUX.1-schnell:vae", {}, "flux-vae", ["vae/config.json",
                                                               "vae/diffusion_pytorch_model.safetensors"]),
    ("black-forest-labs/FLUX.1-schnell", {"subfolder": "vae"}, "flux-vae", None),
    ("black-forest-labs/FLUX.1-schnell/vae", {}, "flux-vae", None),
    ("stabilityai/sd-vae-ft-mse-original/vae-ft-mse-840000-ema-pruned.safetensors", {},
     "ldm/vae-ft-mse-840000-ema-pruned.safetensors", ["vae-ft-mse-840000-ema-pruned.safetensors"]),
    ("stabilityai/sd-vae-ft-mse-original", {"filename": "vae-ft-mse-840000-ema-pruned.safetensors"},
     "ldm/vae-ft-mse-840000-ema-pruned.safetensors", None),
    ("stabilityai/sd-vae-ft-mse-original", {}, "ldm/vae-ft-mse-840000-ema-pruned.safetensors", None),
    ("mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers", {}, "dcae-diffusers", None),
    ("someone/taesd-flax", {}, "taesd-flax", ["config.json", "params.safetensors"]),
])
def test_hub_forms_load_what_the_local_folder_loads(hf, local, source, options, expected, downloads):
    vae = flax_vae.load(source, **options)
    assert_same(vae, flax_vae.load(local / expected))
    repo = hub.parse(source)["repo_id"]
    if downloads is not None:
        assert sorted(hf.downloaded(repo)) == sorted(downloads)
    assert not any(path.endswith((".bin", ".pth", ".ckpt")) or "transformer" in path for path in hf.downloaded(repo))
    before = list(hf.downloads)
    config, _, name = flax_vae.loading.read(source, **options)  # again: from the cache, nothing downloaded twice
    assert config == vae.config and name == vae.name and hf.downloads == before


def test_same_outputs_as_the_local_folder(hf, local):
    for source, folder in (("madebyollin/taesd", "taesd-diffusers"), ("black-forest-labs/FLUX.1-schnell:vae",
                                                                       "flux-vae")):
        vae, ref = flax_vae.load(source), flax_vae.load(local / folder)
        z = vae.encode(IMAGE)
        np.testing.assert_array_equal(np.asarray(z), np.asarray(ref.encode(IMAGE)))
        np.testing.assert_array_equal(np.asarray(vae.decode(z)), np.asarray(ref.decode(z)))
    assert flax_vae.load("madebyollin/taesd").name == "taesd"  # the repository's name picks among equal presets


def test_a_repository_is_chosen_by_its_file_listing(hf):
    """MIT-HAN's own DC-AE repos: a config.json that is not diffusers' and one model.safetensors -> that file."""
    path = hub.fetch("mit-han-lab/dc-ae-f32c32-sana-1.0")
    assert path.is_file() and path.name == "model.safetensors" and "dc-ae-f32c32-sana-1.0" in str(path)
    assert sorted(hf.downloaded("mit-han-lab/dc-ae-f32c32-sana-1.0")) == ["config.json", "model.safetensors"]
    folder = hub.fetch("madebyollin/taesd")  # the diffusers files win over the pair files beside them
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(hf.downloaded("madebyollin/taesd")) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_revision_and_variant(hf, local):
    v2 = flax_vae.load(local / "kl-v2")
    assert_same(flax_vae.load("stabilityai/sd-vae-ft-mse", revision="v2"), v2)
    assert_same(flax_vae.load("stabilityai/sd-vae-ft-mse@v2"), v2)
    assert_same(flax_vae.load("stabilityai/sd-vae-ft-mse", revision=hf.v2), v2)
    hf.downloads.clear()
    half = flax_vae.loading.read("stabilityai/sd-vae-ft-mse", variant="fp16")[1]
    assert {a.dtype for a in jax.tree.leaves(half)} == {np.dtype(np.float16)}
    assert_same(flax_vae.load("stabilityai/sd-vae-ft-mse", variant="fp16", dtype=jnp.float16),
                flax_vae.load(local / "kl-fp16", dtype=jnp.float16))
    # the fp16 file only: main's config.json is v2's (the same blob, cached), never the float32 or .bin weights
    assert hf.downloaded("stabilityai/sd-vae-ft-mse") == [FP16]
    # the default weights after the variant, from the same snapshot: the float32 file, not the fp16 one beside it
    assert_same(flax_vae.load("stabilityai/sd-vae-ft-mse"), flax_vae.load(local / "kl"))
    with pytest.raises(flax_vae.CheckpointError) as e:
        flax_vae.load("stabilityai/sd-vae-ft-mse", variant="bf16")
    assert "diffusion_pytorch_model.bf16.safetensors" in one_line(e) and "leave out variant=" in str(e.value)


def test_offline_after_one_online_run(hf, local, monkeypatch):
    online = {s: flax_vae.load(s) for s in ("madebyollin/taesd", "black-forest-labs/FLUX.1-schnell:vae",
                                             "stabilityai/sd-vae-ft-mse-original")}
    offline(monkeypatch)
    with hf.lock:
        hf.requests.clear()
    for source, vae in online.items():
        assert_same(flax_vae.load(source), vae)
    assert hf.requests == []  # offline: the server is never asked
    for source, kwargs in (("madebyollin/taesdxl", {}), ("stabilityai/sd-vae-ft-mse", {}),
                           ("madebyollin/taesd", {"revision": "v2"}),  # a revision never fetched
                           ("madebyollin/taesd/taesd_encoder.safetensors", {})):  # listed, never downloaded
        with pytest.raises(flax_vae.CheckpointError) as e:
            flax_vae.load(source, **kwargs)
        assert "not in the local cache" in one_line(e) and "HF_HUB_OFFLINE=1" in str(e.value)
        assert "run once online" in str(e.value)


def test_local_files_only(hf):
    with pytest.raises(flax_vae.CheckpointError) as e:
        flax_vae.load("madebyollin/taesd", local_files_only=True)
    assert "not in the local cache" in one_line(e) and "local_files_only=True: run once online" in str(e.value)
    assert hf.requests == []
    vae = flax_vae.load("madebyollin/taesd")
    assert_same(flax_vae.load("madebyollin/taesd", local_files_only=True), vae)


# errors: one line, naming the fix

@pytest.mark.parametrize("source, options, says", [
    ("nobody/nothing", {}, ["nobody/nothing was not found on the Hub", "check the id",
                            "private repos need token= or `hf auth login`"]),
    ("someone/private-vae", {}, ["someone/private-vae was not found on the Hub", "token="]),
    ("black-forest-labs/FLUX.1-dev:vae", {}, ["gated", "request access at http://127.0.0.1",
                                              "black-forest-labs/FLUX.1-dev", "`hf auth login`"]),
    ("black-forest-labs/FLUX.1-dev:vae", {"token": "hf_other"}, ["gated", "your token has no access"]),
    ("stabilityai/sd-vae-ft-mse", {"revision": "v3"}, ["revision 'v3' not found on the Hub", "branch, tag or commit"]),
    ("someone/no-weights", {}, ["no weights flax-vae can load", "README.md, notes.txt", "filename="]),
    ("black-forest-labs/FLUX.1-schnell", {}, ["a diffusers pipeline", "subfolder='vae'",
                                              "black-forest-labs/FLUX.1-schnell:vae"]),
    ("black-forest-labs/FLUX.1-schnell:unet", {}, ["no such folder", "transformer, vae"]),
    ("black-forest-labs/FLUX.1-schnell:transformer", {}, ["a diffusers FluxTransformer2DModel, not an autoencoder",
                                                          "AutoencoderKL"]),
    ("stabilityai/sd-vae-ft-mse-original/missing.safetensors", {}, ["no file or folder 'missing.safetensors'",
                                                                     "vae-ft-mse-840000-ema-pruned.safetensors"]),
    ("madebyollin/taesd:vae", {"subfolder": "decoder"}, ["subfolder given twice"]),
    ("no/such/local/path.safetensors", {}, ["no/such was not found on the Hub"]),
])
def test_errors_are_one_line_and_name_the_fix(hf, source, options, says):
    with pytest.raises(flax_vae.CheckpointError) as e:
        flax_vae.load(source, **options)
    message = one_line(e)
    assert all(s in message for s in says), message
    assert not any(path.endswith((".safetensors", ".bin")) for _, path in hf.downloads)


def test_tokens_open_private_and_gated_repositories(hf, local):
    assert_same(flax_vae.load("someone/private-vae", token=TOKEN), flax_vae.load(local / "kl"))
    assert_same(flax_vae.load("black-forest-labs/FLUX.1-dev:vae", token=TOKEN), flax_vae.load(local / "gated-vae"))


def test_a_local_path_wins_over_a_hub_id(hf, local, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    flax_vae.save(flax_vae.load("taesdxl"), tmp_path / "madebyollin" / "taesd", to="madebyollin")
    vae = flax_vae.load("madebyollin/taesd")
    assert hf.requests == [] and vae.name == "taesdxl"
    assert hub.fetch("madebyollin/taesd").resolve() == tmp_path / "madebyollin" / "taesd"
    assert not hub.is_hub_id("madebyollin/taesd") and hub.is_hub_id("madebyollin/taesdxl")
    assert flax_vae.load("taesd").name == "taesd" and hf.requests == []  # bundled names stay bundled


def test_parts_as_hub_files(hf):
    vae = flax_vae.load(encoder="madebyollin/taesd/taesd_encoder.safetensors")
    assert_same(vae, flax_vae.load(encoder=flax_vae.loading.WEIGHTS_DIR / "taesd_encoder.safetensors"))
    assert hf.downloaded("madebyollin/taesd") == ["taesd_encoder.safetensors"]


# the command line

def image(path, size=32, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(path)
    return path


def test_cli_reconstruct_convert_info(hf, local, tmp_path, capsys):
    out = tmp_path / "out"
    cli.main(["reconstruct", str(image(tmp_path / "in.png")), "--model", "madebyollin/taesd", "--out", str(out)])
    assert "PSNR" in capsys.readouterr().out and (out / "in.png.reconstruction.png").is_file()
    cli.main(["convert", "black-forest-labs/FLUX.1-schnell:vae", str(tmp_path / "flux")])
    assert_same(flax_vae.load(tmp_path / "flux"), flax_vae.load(local / "flux-vae"))
    cli.main(["convert", "black-forest-labs/FLUX.1-schnell", str(tmp_path / "flux2"), "--subfolder", "vae"])
    assert_same(flax_vae.load(tmp_path / "flux2"), flax_vae.load(local / "flux-vae"))
    capsys.readouterr()
    cli.main(["info", "stabilityai/sd-vae-ft-mse", "--revision", "v2"])
    assert "family      kl" in capsys.readouterr().out
    cli.main(["info", "stabilityai/sd-vae-ft-mse", "--variant", "fp16"])
    assert "dtype       float16" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "stabilityai/sd-vae-ft-mse", "--revision", "v3"])
    assert str(e.value.code).startswith("error: stabilityai/sd-vae-ft-mse: revision 'v3' not found")
    assert "\n" not in str(e.value.code)


def test_cli_encode_dataset_gets_the_hub_options(hf, local, monkeypatch, tmp_path):
    pytest.importorskip("grain")
    from flax_vae import encode_dataset
    got = []
    monkeypatch.setattr(encode_dataset, "encode_dataset", lambda model, *a, **k: got.append(model))
    base = ["encode-dataset", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    cli.main(base + ["--model", "stabilityai/sd-vae-ft-mse", "--revision", "v2"])
    assert_same(got[-1], flax_vae.load(local / "kl-v2"))
    cli.main(base + ["--model", "black-forest-labs/FLUX.1-schnell:vae"])  # a plain source: passed on as it is
    assert got[-1] == "black-forest-labs/FLUX.1-schnell:vae"


def test_cli_help_names_the_hub_options(capsys):
    for command in ("reconstruct", "convert", "info", "encode-dataset"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(option in text for option in ("--subfolder", "--revision", "--variant", "org/name")), command


def test_saved_listing_is_json(hf):
    """The listing an online run saves beside the snapshots (what offline runs decide by)."""
    flax_vae.load("madebyollin/taesd")
    from huggingface_hub import constants
    [saved] = (Path(constants.HF_HUB_CACHE) / "models--madebyollin--taesd" / "flax-vae").glob("*/files.json")
    assert "taesd_encoder.pth" in json.loads(saved.read_text())


def test_an_unreachable_hub_falls_back_to_the_cache(hf, monkeypatch):
    from huggingface_hub import constants
    vae = flax_vae.load("madebyollin/taesd")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    assert_same(flax_vae.load("madebyollin/taesd"), vae)


def test_distill_teacher_from_the_hub(hf, tmp_path):
    pytest.importorskip("optax")
    from flax_vae.train import distill
    for folder, n in (("train", 2), ("eval", 1)):
        for i in range(n):
            (tmp_path / folder).mkdir(exist_ok=True)
            image(tmp_path / folder / f"{i}.png", 64, seed=i)
    (tmp_path / "tiny.json").write_text(json.dumps({"width": 8, "depth": 1}))
    d = distill.Distiller(distill.Config(teacher="madebyollin/taesd@main", data=str(tmp_path / "train"),
                                         eval_data=str(tmp_path / "eval"), student=str(tmp_path / "tiny.json"),
                                         out=str(tmp_path / "run"), crop="32", eval_size=32))
    assert_same(d.teacher, flax_vae.load("taesd"))


def test_flax_autoencoder_kl_from_the_hub(hf, local):
    """The drop-in class takes Hub ids as diffusers' did: a diffusers Flax (msgpack) repository, and a pipeline's
    vae subfolder of PyTorch weights."""
    module, params = flax_vae.FlaxAutoencoderKL.from_pretrained("pcuenq/sd-vae-ft-mse-flax")
    _, expected = flax_vae.FlaxAutoencoderKL.from_pretrained(DIFFUSERS_FLAX)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)))
    assert module.sample_size == 128  # from the repository's config.json
    module, params = flax_vae.FlaxAutoencoderKL.from_pretrained("black-forest-labs/FLUX.1-schnell", subfolder="vae",
                                                                revision="main")
    native = flax_vae.convert.from_diffusers_flax(params, module.kl_config)
    ref = flax_vae.load(local / "flux-vae")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(ref.params)))
