"""Distillation (train/): a short smoke run learns, exports reload (diffusers too), resume is exact (after kill -9 at
random moments: tests/test_kills.py), bad input."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

import flax_vae
from flax_vae.images import BUNDLED_PHOTOS
from flax_vae.train import distill, students

# Teacher: the bundled TAESD (classic layout, so a diffusers export exists); student: 8 channels, 1 block per stage.
TINY = dict(teacher="taesd", crop="32", batch_size=8, pool_size=16, pool_reuse=2, eval_size=32, eval_every=4,
            grid_every=4, checkpoint_every=2, warmup=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    (root / "train").mkdir()
    (root / "eval").mkdir()
    for path in BUNDLED_PHOTOS[:2]:  # downsized: crops then cover more of each photo
        Image.open(path).convert("RGB").reduce(4).save(root / "train" / path.name)
    Image.open(BUNDLED_PHOTOS[2]).convert("RGB").reduce(4).save(root / "eval" / "held_out.png")
    (root / "tiny.json").write_text(json.dumps({"width": 8, "depth": 1}))
    return root


def config(folders, out, **kw):
    return distill.Config(**{**TINY, "data": str(folders / "train"), "eval_data": str(folders / "eval"),
                             "student": str(folders / "tiny.json"), "out": str(out), **kw})


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke(folders, tmp_path_factory):
    run = tmp_path_factory.mktemp("smoke") / "run"
    return run, distill.distill(config(folders, run, steps=16, lr=3e-3))


def test_smoke_distillation_learns_and_exports(smoke):
    run, result = smoke
    curve = metrics(run)
    assert [m["step"] for m in curve] == [0, 4, 8, 12, 16]
    assert curve[-1]["psnr_ema"] > curve[0]["psnr_ema"] + 1  # the decoder moves towards the teacher
    assert curve[-1]["latent_mse_ema"] < curve[0]["latent_mse_ema"]  # and the encoder
    assert (run / "grids" / "step_000016.png").is_file() and list((run / "tensorboard").iterdir())

    vae = flax_vae.load(run / "export" / "flax")
    assert vae.config == flax_vae.TAESDConfig(latent_channels=4, width=8, depth=1)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    z = np.asarray(vae.encode(x))
    same = flax_vae.load(run / "export" / "madebyollin")
    np.testing.assert_array_equal(np.asarray(same.decode(z)), np.asarray(vae.decode(z)))

    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderTiny
    ref = AutoencoderTiny.from_pretrained(result["export"]["diffusers"]).eval()
    with torch.no_grad():
        y = ref.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, np.asarray(vae.decode(z)), atol=1e-4)


def test_resume_reaches_the_uninterrupted_parameters(folders, tmp_path):
    kw = dict(steps=6, adversarial=0.1, gradient_loss=0.5, optimizer="muon")  # discriminator and Muon states too
    whole = distill.distill(config(folders, tmp_path / "whole", **kw))
    distill.distill(config(folders, tmp_path / "parts", until=3, **kw))  # "killed" mid-pool, after step 3
    assert not (tmp_path / "parts" / "export").exists()
    resumed = distill.distill(config(folders, tmp_path / "parts", **kw), resume=True)
    assert resumed["step"] == whole["step"] == 6
    a, b = (flax_vae.load(tmp_path / run / "export" / "flax").params for run in ("whole", "parts"))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pruning_to_the_teachers_width_is_the_teacher():
    teacher = flax_vae.load("taef2")
    config = students.student_config("taesd", 32, 8, teacher.config)
    assert config == teacher.config
    params = students.initial_params(config, ("encoder", "decoder"), jax.random.PRNGKey(0), teacher.config,
                                     teacher.params)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(teacher.params)):
        np.testing.assert_array_equal(x, np.asarray(y))
    half = students.student_config("taesd-half", 32, 8, teacher.config)
    pruned = students.initial_params(half, ("decoder",), jax.random.PRNGKey(0), teacher.config, teacher.params)
    assert pruned["decoder"]["blocks_0_0"]["pool_in"]["kernel"].shape == (1, 1, 32, 128)


def test_half_width_taef2_student_exports_without_diffusers(folders, tmp_path):
    d = distill.Distiller(config(folders, tmp_path / "x", teacher="taef2", student="taesd-half", parts="decoder"))
    written = d.export(d.init_state(), tmp_path / "export")
    assert "mid-block GroupNorm" in written["diffusers"] and not (tmp_path / "export" / "diffusers").exists()
    vae = flax_vae.load(tmp_path / "export" / "madebyollin")
    assert vae.config.width == 32 and vae.config.midblock_gn and set(vae.params) == {"decoder"}


def test_bad_inputs(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        distill.Distiller(config(folders, tmp_path / "r", data=str(empty)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "photo.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="photo.png: not a readable image"):
        distill.Distiller(config(folders, tmp_path / "r", data=str(broken)))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"latent_channels": 16}))
    with pytest.raises(ValueError, match="latent_channels 16 does not match the teacher's latent space"):
        distill.Distiller(config(folders, tmp_path / "r", student=str(wrong)))
    with pytest.raises(ValueError, match="factor 32 does not match"):
        distill.Distiller(config(folders, tmp_path / "r", student="taesd-f32"))
    with pytest.raises(ValueError, match="--optimizer 'sgd': adamw or muon"):
        distill.Distiller(config(folders, tmp_path / "r", optimizer="sgd"))
    with pytest.raises(ValueError, match="cannot take the teacher's weights"):
        distill.Distiller(config(folders, tmp_path / "r", init="teacher")).init_state()
    assert not (tmp_path / "r").exists()  # nothing written for a run that cannot start


def test_divergence_stops_the_run(folders, tmp_path):
    with pytest.raises(FloatingPointError, match="diverged: lower --lr"):
        distill.distill(config(folders, tmp_path / "r", steps=8, lr=1e9, clip=1e9))
    assert not (tmp_path / "r" / "export").exists()


def test_incompatible_resume_and_occupied_folder_are_refused(folders, smoke, tmp_path):
    run = smoke[0]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already exists"):
        distill.distill(config(folders, run, steps=16, lr=3e-3))
    with pytest.raises(ValueError, match=r"other settings: lr 0.003 \(now 0.01\)"):
        distill.distill(config(folders, run, steps=16, lr=0.01), resume=True)
    with pytest.raises(ValueError, match="holds no run"):
        distill.distill(config(folders, tmp_path / "none", steps=2), resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_new_run_takes_the_folder_of_one_killed_before_its_config_was_written(folders, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.json.k1ll3d.partial").write_text('{"teach')  # the temporary file of an unfinished write
    assert distill.check_run(config(folders, run), resume=False) == run
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        distill.check_run(config(folders, run), resume=False)


def test_crop_schedule():
    schedule = distill.crop_schedule("64,96@300,128@600")
    assert [distill.crop_at(schedule, s) for s in (0, 299, 300, 599, 600, 10**6)] == [64, 64, 96, 96, 128, 128]
    for bad in ("64,96", "96@10,64", "64,128@600,96@300", "big"):
        with pytest.raises(ValueError, match="--crop"):
            distill.crop_schedule(bad)


def test_cli_delegates(folders, tmp_path, capsys):
    from flax_vae import cli
    with pytest.raises(SystemExit, match="no images"):
        cli.main(["distill", "--teacher", "taesd", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
