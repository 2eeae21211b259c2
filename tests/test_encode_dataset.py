"""flax-vae encode-dataset / verify-latents (flax_vae/encode_dataset.py, flax_vae/dataset.py) on small variants of
the bundled photographs with the real TAESD weights: shards equal `vae.encode` of the same preprocessed images,
in both modes; a rerun redoes exactly the damaged units (kill -9 at random moments: tests/test_kills.py), also after
a NaN and a full disk; two processes on loopback equal one; damaged and tiny files are skipped and reported; bad
arguments fail at once. Sharded and single-device latents agree to float32 rounding,
1e-5 (see tests/test_parallel.py)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import flax_vae
from flax_vae import cli, dataset, encode_dataset, images, kl
from flax_vae.autoencoder import Autoencoder
from flax_vae.encode_dataset import read_shard, verify
from flax_vae.images import BUNDLED_PHOTOS

from conftest import encoded, run_processes, write_tar

ATOL = 1e-5
# one image per shard: 23 units, for a NaN or a full disk to stop a run half-way; 8: the CPU devices (conftest)
SETTINGS = dict(resolution=64, shard_size=1, batch_size=8, progress=False)
BAD = {"bad/not_an_image.jpg": "not an image", "bad/truncated.jpg": "truncated", "bad/empty.png": "not an image",
       "bad/tiny.png": "20x30 is smaller than the minimum size 32", "broken.tar/000002.jpg": "truncated tar member",
       "broken.tar": "damaged"}


def _variants():
    """Seventeen crops and resizes of the three photographs: sizes 40-180 px, aspect ratios 1:3 to 3:1."""
    out = []
    for i, path in enumerate(BUNDLED_PHOTOS):
        im = Image.open(path).convert("RGB")
        for j, (box, size) in enumerate([((0, 0, 300, 300), (96, 96)), ((50, 20, 290, 120), (180, 75)),
                                         ((10, 0, 110, 290), (60, 174)), ((0, 0, 280, 200), (140, 100)),
                                         ((40, 40, 240, 140), (120, 60)), ((0, 0, 290, 296), (48, 40))]):
            if i * 6 + j < 17:
                out.append(im.crop(box).resize(size, Image.Resampling.BICUBIC))
    return out




@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of 12 photos (jpg, png, webp, in subfolders), a webdataset shard of 5 more (with .txt members, which
    are not images), and damaged or tiny files."""
    root = tmp_path_factory.mktemp("inputs")
    images = _variants()
    for i, image in enumerate(images[:12]):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        path = root / f"photos/{i % 2}/photo{i:02d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    members = {}
    for i, image in enumerate(images[12:]):
        members[f"{i:06d}.jpg"] = encoded(image, "JPEG")
        members[f"{i:06d}.txt"] = b"a caption"
    write_tar(root / "shard-000000.tar", members)
    (root / "bad").mkdir()
    (root / "bad/not_an_image.jpg").write_bytes(b"<html>404</html>")
    jpeg = encoded(images[0], "JPEG")
    (root / "bad/truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (root / "bad/empty.png").write_bytes(b"")
    (root / "bad/tiny.png").write_bytes(encoded(images[0].resize((30, 20)), "PNG"))
    write_tar(root / "broken.tar", {"000001.jpg": jpeg, "000002.jpg": jpeg})
    second_member_data = 512 + -(-len(jpeg) // 512) * 512 + 512  # after a header, the first member, a header
    (root / "broken.tar").write_bytes((root / "broken.tar").read_bytes()[:second_member_data + len(jpeg) // 2])
    (root / "notes.txt").write_text("not an image: ignored")
    return root


@pytest.fixture(scope="module")
def taesd():
    return flax_vae.load("taesd")


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """One uninterrupted single-process run, centre mode."""
    out = tmp_path_factory.mktemp("reference")
    stats = encode_dataset.encode_dataset("taesd", inputs, out, **SETTINGS)
    return out, stats


def _rows(output):
    """Every image in the shards of an output folder: key -> {array name: its row, "size": "HxW"}."""
    rows = {}
    for path in sorted(Path(output).glob("latents-*.safetensors")):
        for size, g in read_shard(path).items():
            for r, key in enumerate(g.pop("keys")):
                assert key not in rows, f"{key} is in two shards"
                rows[key] = {name: a[r] for name, a in g.items()} | {"size": size}
    return rows


def _assert_same_output(got, want):
    got_rows, want_rows = _rows(got), _rows(want)
    assert got_rows.keys() == want_rows.keys()
    for key, row in want_rows.items():
        assert got_rows[key].keys() == row.keys()
        assert got_rows[key].pop("size") == row.pop("size")
        for name, value in row.items():
            np.testing.assert_allclose(got_rows[key][name], value, atol=ATOL, err_msg=f"{key} {name}")
    manifests = [json.loads((Path(d) / "manifest.json").read_text()) for d in (got, want)]
    for m in manifests:
        m.pop("sources")
        for shard in m["shards"]:
            shard.pop("sha256")  # equal latents to 1e-5, not necessarily bit for bit
    assert manifests[0] == manifests[1]
    assert (Path(got) / "skipped.jsonl").read_text() == (Path(want) / "skipped.jsonl").read_text()
    assert verify(got)[1] == []
    assert not list(Path(got).glob(".*partial")), "temporary files left behind"


def _good_keys(inputs):
    keys = {p.relative_to(inputs).as_posix() for p in (inputs / "photos").rglob("*.*")}
    return keys | {f"shard-000000.tar/{i:06d}.jpg" for i in range(5)} | {"broken.tar/000001.jpg"}


def test_shards_equal_vae_encode_of_the_preprocessed_images(inputs, reference, taesd):
    out, stats = reference
    items = {item.key: item for item in dataset.discover(inputs)[0]}
    pre = dataset.Preprocessing(64, min_size=32)
    rows = _rows(out)
    assert rows.keys() == _good_keys(inputs)
    loaded = {key: pre.load(items[key].read()) for key in sorted(rows)}
    want = taesd.encode(np.stack([loaded[k][0] for k in sorted(rows)]).astype(np.float32) / 127.5 - 1)
    for key, z in zip(sorted(rows), np.asarray(want)):
        row = rows[key]
        np.testing.assert_allclose(row["latents"], z, atol=ATOL, err_msg=key)
        assert row["size"] == "64x64" and row["latents"].shape == (8, 8, 4)
        assert tuple(row["original_sizes"]) == loaded[key][1]
        np.testing.assert_allclose(row["crop_boxes"], loaded[key][2], rtol=1e-6)
        assert list(items).index(key) == row["indices"]
    # tar members are read from their byte offsets: the same bytes as the file they were made from
    assert rows["broken.tar/000001.jpg"]["latents"].tolist() == rows["photos/0/photo00.jpg"]["latents"].tolist()
    assert stats["encoded"] == len(rows) == 18 and stats["skipped"] == 4 + 1  # files + tar members


def test_bad_files_are_skipped_and_reported(reference):
    out, _ = reference
    skipped = {s["key"]: s["reason"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert skipped.keys() == BAD.keys()
    for key, reason in BAD.items():
        assert reason in skipped[key], (key, skipped[key])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == dict(inputs=23, encoded=18, skipped=5, unreadable_tar_files=1, shards=23)
    assert manifest["model"]["family"] == "taesd" and manifest["scaling"] == dict(scaling_factor=1.0,
                                                                                  shift_factor=0.0)


def test_verify_latents_finds_damage(reference, tmp_path, capsys):
    cli.main(["verify-latents", str(reference[0])])
    assert "OK" in capsys.readouterr().out
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    shard = out / "latents-000002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    (out / "latents-000004.safetensors").unlink()
    problems = verify(out)[1]
    assert any("latents-000002" in p and "sha256" in p for p in problems)
    assert any("latents-000004" in p and "missing" in p for p in problems)
    with pytest.raises(SystemExit, match="problems"):
        cli.main(["verify-latents", str(out)])


def test_resume_redoes_exactly_the_damaged_units(inputs, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("latents-*")}
    stats = encode_dataset.encode_dataset("taesd", inputs, out, **SETTINGS)
    assert stats["shards_written"] == 0 and stats["encoded"] == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("latents-*")}

    data = bytearray((out / "latents-000001.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "latents-000001.safetensors").write_bytes(bytes(data))  # damaged after it was recorded
    (out / "latents-000003.json").unlink()  # killed between writing the shard and its record
    (out / ".latents-000004.safetensors.partial").write_bytes(b"half a shard")
    (out / "manifest.json").unlink()
    stats = encode_dataset.encode_dataset("taesd", inputs, out, **{**SETTINGS, "batch_size": 16})
    assert stats["shards_written"] == 2 and stats["shards_already_done"] == 21
    _assert_same_output(out, reference[0])


def test_a_different_job_in_the_same_folder_is_refused(inputs, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    with pytest.raises(ValueError, match="holds a different job .*preprocessing"):
        encode_dataset.encode_dataset("taesd", inputs, out, **{**SETTINGS, "resolution": 128})
    with pytest.raises(ValueError, match="holds a different job .*model"):
        encode_dataset.encode_dataset("taesdxl", inputs, out, **SETTINGS)


def test_non_finite_latents_stop_the_job(inputs, taesd, tmp_path):
    broken = Autoencoder(taesd.config, taesd.module, jax.tree.map(lambda p: p * np.nan, taesd.params), "nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        encode_dataset.encode_dataset(broken, inputs / "photos", tmp_path, **SETTINGS)
    assert not list(tmp_path.glob("latents-*"))


def test_a_nan_mid_way_names_the_image_and_writes_no_bad_shard(inputs, reference, monkeypatch, tmp_path):
    """The encoder (patched) makes NaN for one image, photos/1/photo01.png: the job stops naming it, before its
    unit's shard (the units before it are written); the next run, without the NaN, resumes."""
    encode = encode_dataset._encode_batch
    keys = [item.key for item in dataset.discover(inputs)[0]]
    bad = keys.index("photos/1/photo01.png")

    def nan_for_one_image(module, stored, seed, params, pixels, indices):
        out = encode(module, stored, seed, params, pixels, indices)
        return {k: jnp.where((indices == bad)[:, None, None, None], jnp.nan, v) for k, v in out.items()}

    monkeypatch.setattr(encode_dataset, "_encode_batch", nan_for_one_image)
    with pytest.raises(FloatingPointError) as e:
        encode_dataset.encode_dataset("taesd", inputs, tmp_path, **SETTINGS)
    assert str(e.value).startswith("photos/1/photo01.png: encode: Autoencoder(taesd:taesd") and \
        "produced NaN or infinite" in str(e.value) and \
        f"stopped before writing latents-{bad:06d} (the shards written so far are kept)" in str(e.value)
    assert sorted(p.name for p in tmp_path.glob("latents-*.json")) == [f"latents-{u:06d}.json" for u in range(bad)]
    assert not list(tmp_path.glob(f"latents-{bad:06d}.*")) and not list(tmp_path.glob(".*.partial"))
    monkeypatch.undo()
    stats = encode_dataset.encode_dataset("taesd", inputs, tmp_path, **SETTINGS)
    assert stats["shards_already_done"] == bad
    _assert_same_output(tmp_path, reference[0])


def test_a_full_disk_is_one_error_and_the_rerun_resumes(inputs, reference, tmp_path):
    """A full disk, simulated without privileges by RLIMIT_FSIZE (set by the child process first; Python ignores
    SIGXFSZ, so a write past the limit fails with EFBIG as it would with ENOSPC): the limit lets job.json and the
    photos' shards through, not the longer-named tar members' (units 18-22). One error line names the file; no
    file is torn or left behind; the rerun without the limit resumes."""
    shards = {p.name: p.stat().st_size for p in reference[0].glob("latents-*.safetensors")}
    limit = shards["latents-000013.safetensors"]  # photos/1/photo11.webp
    assert (reference[0] / "job.json").stat().st_size <= limit < shards["latents-000018.safetensors"]
    argv = ["encode-dataset", "--model", "taesd", "--input", inputs, "--output", tmp_path, "--resolution", "64",
            "--shard-size", "1"]
    limited = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
               f"from flax_vae.cli import main; main(sys.argv[1:])")
    p = subprocess.run([sys.executable, "-c", limited, *map(str, argv)], capture_output=True, text=True,
                       timeout=300, check=False)
    error = (f"error: file size limit exceeded while writing {tmp_path / 'latents-000018.safetensors'} (File too "
             f"large); nothing was half written: free some space (or raise the limit) and run the same command again")
    assert p.returncode == 1 and [line for line in p.stderr.splitlines() if "error" in line] == [error], p.stderr
    assert not list(tmp_path.glob(".*.partial")) and not (tmp_path / "latents-000018.safetensors").exists()
    stats = encode_dataset.encode_dataset("taesd", inputs, tmp_path, **SETTINGS)
    assert stats["shards_already_done"] == 18 and stats["shards_written"] == 5
    _assert_same_output(tmp_path, reference[0])


def test_buckets(inputs, tmp_path, taesd):
    pre = dataset.Preprocessing(128, buckets=True, bucket_step=32, min_size=32)
    encode_dataset.encode_dataset("taesd", inputs / "photos", tmp_path, resolution=128, buckets=True,
                                  bucket_step=32, min_size=32, batch_size=8, shard_size=100, progress=False)
    items = {item.key: item for item in dataset.discover(inputs / "photos")[0]}
    rows = _rows(tmp_path)
    assert rows.keys() == items.keys()
    groups = {}
    for key, row in rows.items():
        pixels, original, box = pre.load(items[key].read())
        h, w = pre.target_size(*original)
        assert row["size"] == f"{h}x{w}" and pixels.shape == (h, w, 3) and tuple(row["original_sizes"]) == original
        top, left, bottom, right = row["crop_boxes"]
        assert top == pytest.approx(original[0] - bottom) and left == pytest.approx(original[1] - right)  # centred
        assert (right - left) / (bottom - top) == pytest.approx(w / h, rel=1e-5)
        groups.setdefault((h, w), []).append((key, pixels))
    assert len(groups) >= 3
    for group in groups.values():
        want = taesd.encode(np.stack([p for _, p in group]).astype(np.float32) / 127.5 - 1)
        for (key, _), z in zip(group, np.asarray(want)):
            np.testing.assert_allclose(rows[key]["latents"], z, atol=ATOL, err_msg=key)


def test_bucket_sizes():
    sizes = dataset.bucket_sizes(1024, 64)
    assert (1024, 1024) in sizes and (512, 2048) in sizes and (2048, 512) in sizes
    for h, w in sizes:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2 and max(h / w, w / h) <= 4 and (w, h) in sizes
    pre = dataset.Preprocessing(1024, buckets=True)
    assert pre.target_size(1000, 1000) == (1024, 1024)
    assert pre.target_size(600, 1600) == (640, 1600)  # aspect 2.67: 1600/640 = 2.5 is the closest
    assert pre.target_size(10, 1000) == (512, 2048)  # beyond the widest: the widest


def test_centre_crop_stays_inside_the_image():
    for target in [(64, 64), (48, 80), (64, 256)]:
        for h in range(1, 160):
            for w in range(1, 160):
                top, left, bottom, right = dataset.centre_crop(h, w, *target)
                assert 0 <= top and 0 <= left and bottom <= h and right <= w
                assert (right - left) / (bottom - top) == pytest.approx(target[1] / target[0])
    # 64 / (64 / 103) = 103.00000000000001: a crop 1 ulp larger than the image, refused by Pillow
    photo = Image.open(BUNDLED_PHOTOS[0]).resize((103, 103))
    assert dataset.Preprocessing(64).load(encoded(photo, "PNG"))[0].shape == (64, 64, 3)


def test_exif_orientation_and_jpeg_draft():
    photo = Image.open(BUNDLED_PHOTOS[1]).convert("RGB")  # coffee, 400x600
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # stored sideways, shown rotated 90 degrees clockwise
    stored = photo.transpose(Image.Transpose.ROTATE_90)
    pre = dataset.Preprocessing(64, buckets=True, bucket_step=16)
    upright = pre.load(encoded(photo, "PNG"))
    turned = pre.load(encoded(stored, "PNG", exif=exif))
    assert turned[1] == upright[1] == (400, 600)
    np.testing.assert_array_equal(turned[0], upright[0])
    # a 1200x1800 JPEG is decoded at 1/8 scale (150x225; 48x80 is the bucket): close to the full decode
    big = photo.resize((1800, 1200), Image.Resampling.BICUBIC)
    full = pre.load(encoded(big, "PNG"))[0].astype(float)
    draft = pre.load(encoded(big, "JPEG", quality=95))[0].astype(float)
    assert full.shape == draft.shape == (48, 80, 3)
    assert 10 * np.log10(255 ** 2 / np.mean((full - draft) ** 2)) > 30


def test_posterior_logvar_and_samples(inputs, tmp_path):
    config = kl.KLConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
    module = kl.AutoencoderKL(config)
    shapes = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    rng = np.random.default_rng(0)  # random weights without running init (which compiles the whole model: slow)
    vae = Autoencoder(config, module, jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32),
                                                   shapes), "tiny")
    flax_vae.save(vae, tmp_path / "tiny")
    settings = dict(resolution=32, min_size=32, shard_size=8, logvar=True, sample=True, seed=7, progress=False)
    encode_dataset.encode_dataset(str(tmp_path / "tiny"), inputs / "photos", tmp_path / "a", batch_size=8,
                                  **settings)
    encode_dataset.encode_dataset(str(tmp_path / "tiny"), inputs / "photos", tmp_path / "b", batch_size=16,
                                  threads=1, **settings)
    _assert_same_output(tmp_path / "b", tmp_path / "a")  # samples do not depend on batching
    items = {item.key: item for item in dataset.discover(inputs / "photos")[0]}
    pre = dataset.Preprocessing(32, min_size=32)
    rows = _rows(tmp_path / "a")
    keys = sorted(rows)
    images = np.stack([pre.load(items[k].read())[0] for k in keys]).astype(np.float32) / 127.5 - 1
    mean, logvar = vae.posterior(images)
    for key, m, lv in zip(keys, np.asarray(mean), np.asarray(logvar)):
        row = rows[key]
        np.testing.assert_allclose(row["latents"], m, atol=ATOL)
        np.testing.assert_allclose(row["logvar"], lv, atol=ATOL)
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(7), int(row["indices"])), m.shape)
        np.testing.assert_allclose(row["samples"], m + np.exp(0.5 * lv) * noise, atol=ATOL)
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert manifest["stored"] == ["latents", "logvar", "samples"]
    assert manifest["scaling"] == dict(scaling_factor=0.18215, shift_factor=0.0)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "no/such/model"),
    ([], "--model"),
    (["--model", "taesd", "--output", "{file}/out"], "cannot create"),
    (["--model", "taesd", "--input", "/no/such/folder"], "no such file or folder"),
    (["--model", "taesd", "--resolution", "100"], "multiples of the model's factor 8"),
    (["--model", "taesd", "--batch-size", "6"], "multiple of the 8 local devices"),
    (["--model", "taesd", "--sample"], "deterministic"),
    (["--model", "taesd", "--shard-size", "0"], "shard_size must be a positive integer"),
], ids=["missing-model", "no-model", "unwritable-output", "missing-input", "resolution", "batch", "sample", "shard"])
def test_bad_arguments_fail_at_once(inputs, tmp_path, args, message):
    (tmp_path / "file").write_text("")
    argv = ["encode-dataset", "--input", str(inputs), "--output", str(tmp_path / "out"), "--resolution", "64",
            *[a.format(file=tmp_path / "file") for a in args]]
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)
    assert not list(tmp_path.rglob("latents-*"))


def test_two_processes_equal_one(inputs, reference, tmp_path):
    argv = ["-m", "flax_vae.cli", "encode-dataset", "--model", "taesd", "--input", inputs, "--output", tmp_path,
            "--resolution", "64", "--shard-size", "1", "--batch-size", "4", "--distributed"]
    outputs = run_processes(argv, processes=2, devices=2)
    assert "process 0: encoded" in outputs[0] and "process 1: encoded" in outputs[1]
    assert "into 12 shards" in outputs[0] and "into 11 shards" in outputs[1]  # even and odd units
    _assert_same_output(tmp_path, reference[0])
