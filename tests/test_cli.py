"""The `flax-vae` command line: reconstruct (tiles, memory budget, output names, bad files), convert (OUT,
--overwrite, a full disk), one-line errors and exit codes, read-only output folders, verify-latents on a
non-output, lean imports, distill's help and unreadable training images."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flax_vae
from flax_vae import cli, encode_dataset, loading


def image(path, h=64, w=64, seed=0):
    """A smooth test picture (gradients plus a little noise), as a file."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([x, y, (x + y) / 2], -1) * 200 + np.random.default_rng(seed).uniform(0, 40, (h, w, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def run(argv, capsys, code=None):
    """cli.main in this process -> (stdout, stderr); with `code`, expects SystemExit with that exit status."""
    if code is None:
        cli.main([str(a) for a in argv])
    else:
        with pytest.raises(SystemExit) as e:
            cli.main([str(a) for a in argv])
        status = e.value.code
        if isinstance(status, str):  # sys.exit("message"): Python prints it to stderr and exits with 1
            print(status, file=sys.stderr)
            status = 1
        assert status == code, (status, capsys.readouterr())
    return capsys.readouterr()


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    return lines[0]


def cli_process(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "flax_vae.cli", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


# reconstruct

def test_reconstruct_tile_option(tmp_path, capsys):
    src = image(tmp_path / "in.png")
    out = run(["reconstruct", src, "--model", "taesd", "--tile", "32:16", "--out", tmp_path / "o"], capsys).out
    assert "in 32:16 tiles" in out and "PSNR" in out and "above --max-pixels" not in out
    assert Image.open(tmp_path / "o" / "in.png.reconstruction.png").size == (2 * 64, 64 + 4)
    out = run(["reconstruct", src, "--model", "taesd", "--tile", "32", "--out", tmp_path / "o"], capsys).out
    assert "in 32:16 tiles" in out  # the overlap defaults to a quarter of the tile, at least twice the factor


@pytest.mark.parametrize("tile", ["abc", "0", "32:32", "32:0", "32:48", "-8", "32:x"])
def test_reconstruct_bad_tile_is_a_usage_error(tmp_path, capsys, tile):
    err = run(["reconstruct", "--model", "taesd", f"--tile={tile}", "--out", tmp_path], capsys, code=2).err
    assert "argument --tile" in one_error_line(err) and "SIZE[:OVERLAP]" in err


def test_reconstruct_tile_must_fit_the_models_factor(tmp_path, capsys):
    err = run(["reconstruct", image(tmp_path / "in.png"), "--model", "taesd", "--tile", "36:12", "--out", tmp_path],
              capsys, code=2).err
    assert "--tile 36:12: SIZE and OVERLAP must be multiples of the model's factor 8" in one_error_line(err)
    assert not list(tmp_path.glob("*.reconstruction.png"))


def test_reconstruct_tiles_above_max_pixels_and_says_so_once(tmp_path, capsys):
    big, small = image(tmp_path / "big.png", 64, 96), image(tmp_path / "small.png", 64, 64)
    out = run(["reconstruct", big, small, "--model", "taesd", "--max-pixels", 64 * 64, "--devices", 1,
               "--out", tmp_path / "o"],
              capsys).out
    notes = [line for line in out.splitlines() if "above --max-pixels" in line]
    assert notes == [f"{big}: 64x96 is above --max-pixels 4096: tiling with 512:128 tiles (memory stays bounded; "
                     f"use --tile to choose)"]
    assert "in 512:128 tiles" in out and "mean PSNR" in out and "over 2 images" in out
    err = run(["reconstruct", "--max-pixels", "0"], capsys, code=2).err
    assert "argument --max-pixels" in one_error_line(err)
    err = run(["reconstruct", "--devices", "9"], capsys, code=2).err
    assert "--devices 9: this machine has 8" in one_error_line(err)
    assert f"default: {cli.MAX_PIXELS}" in run(["reconstruct", "--help"], capsys, code=0).out.replace("\n", " ")


def test_output_names_never_collide(tmp_path, capsys):
    assert cli.output_names(["a/x.png", "b/x.png", "x.jpg", "c/X.PNG", "a/x.png"]) == [
        "x.png.reconstruction.png", "x.png.reconstruction-2.png", "x.jpg.reconstruction.png",
        "X.PNG.reconstruction-3.png", "x.png.reconstruction-4.png"]  # case-insensitive file systems too
    files = [image(tmp_path / "a" / "x.png", seed=1), image(tmp_path / "b" / "x.png", seed=2),
             image(tmp_path / "x.jpg", seed=3)]
    run(["reconstruct", *files, "--model", "taesd", "--out", tmp_path / "o"], capsys)
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert written == ["x.jpg.reconstruction.png", "x.png.reconstruction-2.png", "x.png.reconstruction.png"]
    left = lambda name: np.asarray(Image.open(tmp_path / "o" / name))[:64, :64]  # the original, left half
    assert (left("x.png.reconstruction.png") == np.asarray(Image.open(files[0]))).all()
    assert (left("x.png.reconstruction-2.png") == np.asarray(Image.open(files[1]))).all()


def test_reconstruct_skips_bad_files_and_fails_at_the_end(tmp_path, capsys):
    good = image(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    tiny = image(tmp_path / "tiny.png", 4, 4)
    missing = tmp_path / "missing.png"
    res = run(["reconstruct", tmp_path / "bad.png", tiny, good, missing, "--model", "taesd", "--out",
               tmp_path / "o"], capsys, code=1)
    lines = res.out.splitlines()
    assert any(line.startswith(f"{tmp_path / 'bad.png'}: skipped: not a readable image") for line in lines)
    assert f"{tiny}: skipped: 4x4 is smaller than the model's factor 8x8" in lines
    assert any(line.startswith(f"{missing}: skipped: ") for line in lines)
    assert any(line.startswith(f"{good}: 64x64  PSNR") for line in lines) and "over 1 images" in res.out
    assert one_error_line(res.err) == "error: 3 of 4 images failed (see above)"
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["good.png.reconstruction.png"]


def test_reconstruct_model_arguments(tmp_path, capsys):
    enc = loading.WEIGHTS_DIR / "taesd_encoder.safetensors"
    err = run(["reconstruct", "--model", "taesd", "--encoder", enc], capsys, code=2).err
    assert "give a model or --encoder/--decoder, not both" in one_error_line(err) and "encoder=" not in err
    err = run(["reconstruct", "--encoder", enc, "--out", tmp_path], capsys, code=1).err
    assert "reconstruct needs an encoder and a decoder" in one_error_line(err) and "no decoder" in err
    src = image(tmp_path / "in.png")  # --encoder/--decoder without --model: the default model stays out of it
    out = run(["reconstruct", src, "--encoder", enc, "--decoder", loading.WEIGHTS_DIR / "taesd_decoder.safetensors",
               "--out", tmp_path / "o"], capsys).out
    assert "PSNR" in out and (tmp_path / "o" / "in.png.reconstruction.png").is_file()


# convert and info

def test_convert_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = run(["convert", "taesd", out], capsys, code=1).err
    assert "not empty" in one_error_line(err) and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert "wrote taesd:taesd as flax" in run(["convert", "taesd", out, "--overwrite"], capsys).out
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    run(["convert", "taesd", tmp_path / "new"], capsys)  # a missing or empty OUT needs no --overwrite
    (tmp_path / "empty").mkdir()
    run(["convert", "taesd", tmp_path / "empty"], capsys)
    assert (tmp_path / "empty" / "config.json").is_file()


def test_convert_needs_out_and_takes_encoder_decoder(tmp_path, capsys):
    for argv in (["convert", "taesd"], ["convert"], ["convert", "--encoder", "e.safetensors"]):
        err = run(argv, capsys, code=2).err
        assert "the following arguments are required: OUT" in one_error_line(err) and "encoder=" not in err
    with pytest.raises(SystemExit, match="required: OUT") as e:  # in-process callers get the message too
        cli.main(["convert", "taesd"])
    assert e.value.code == 2
    enc = loading.WEIGHTS_DIR / "taesd_encoder.safetensors"
    out = run(["convert", "--encoder", enc, tmp_path / "e", "--to", "madebyollin"], capsys).out
    assert "wrote taesd:" in out and [p.name for p in (tmp_path / "e").iterdir()] == ["taesd_encoder.safetensors"]
    err = run(["convert", "taesd", tmp_path / "x", "--encoder", enc], capsys, code=2).err
    assert "give a checkpoint (SRC) or --encoder/--decoder, not both" in one_error_line(err)
    err = run(["info"], capsys, code=2).err
    assert "give a checkpoint (SRC) or --encoder/--decoder" in one_error_line(err) and "encoder=" not in err
    assert "parts       encoder\n" in run(["info", "--encoder", enc], capsys).out


# errors

def test_errors_are_one_line_with_exit_status_1_or_2():
    p = cli_process("info", "/no/such/model.safetensors")
    assert p.returncode == 1 and one_error_line(p.stderr) == "error: /no/such/model.safetensors: no such file or folder"
    p = cli_process("convert", "taesd")
    assert p.returncode == 2 and "the following arguments are required: OUT" in one_error_line(p.stderr)
    p = cli_process("--debug", "info", "/no/such/model.safetensors")
    assert p.returncode == 1 and "Traceback" in p.stderr and "CheckpointError" in p.stderr
    p = cli_process("info", "/no/such/model.safetensors", env={"FLAX_VAE_DEBUG": "1"})
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_unexpected_errors_are_caught_but_not_keyboard_interrupt(monkeypatch, capsys):
    def fails(error):
        def info(args):
            raise error
        return info

    monkeypatch.setattr(cli, "info", fails(RuntimeError("boom\nmore detail")))
    err = run(["info", "taesd"], capsys, code=1).err
    assert one_error_line(err) == "error: RuntimeError: boom (--debug shows the traceback)"
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", "info", "taesd"])
    monkeypatch.setenv("FLAX_VAE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["info", "taesd"])
    monkeypatch.delenv("FLAX_VAE_DEBUG")
    monkeypatch.setattr(cli, "info", fails(KeyError("part")))
    assert one_error_line(run(["info", "taesd"], capsys, code=1).err).startswith("error: KeyError: 'part'")
    monkeypatch.setattr(cli, "info", fails(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["info", "taesd"])


# outputs that cannot be written

@pytest.fixture
def unwritable(tmp_path):
    """(a folder where no file can be created, the system's reason). Read-only permissions do it, except for root,
    which they do not stop; as root, /sys, where the kernel refuses new files to everyone (no unprivileged way
    makes a read-only folder for root)."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    for candidate in (folder, Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError as e:
            yield candidate, e.strerror
            break
    else:
        pytest.skip("no unwritable folder: running as root, without /sys")
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["encode-dataset", "convert", "distill", "reconstruct"])
def test_a_read_only_output_is_one_error_before_any_work(unwritable, monkeypatch, tmp_path, capsys, command):
    folder, reason = unwritable
    out = folder / "out"
    argv, what = {"encode-dataset": (["--model", "taesd", "--input", tmp_path, "--output", out], "output"),
                  "convert": (["taesd", out], "OUT"),
                  "distill": (["--teacher", "taesd", "--data", tmp_path, "--out", out], "--out"),
                  "reconstruct": (["--out", out], "--out")}[command]

    def work(*args, **kw):
        raise AssertionError("the model was read before the output was checked")
    for module in (loading, encode_dataset, flax_vae):
        monkeypatch.setattr(module, "load", work)
    monkeypatch.setattr(loading, "read", work)
    err = run([command, *argv], capsys, code=1).err
    assert one_error_line(err) == (f"error: {what} {out}: not writable ({reason} in {folder}); choose another "
                                   f"folder, or make it writable")
    assert not out.exists()


def _limited(size: int) -> str:
    """`python -c` code: the command line, in a process whose files cannot grow past `size` bytes (RLIMIT_FSIZE:
    a full disk without privileges; Python ignores SIGXFSZ, so the write fails with EFBIG, as with ENOSPC)."""
    return (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size})); "
            f"from flax_vae.cli import main; main(sys.argv[1:])")


def test_convert_on_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, capsys):
    """100 KB at most per file (the TAESD weights are 10 MB): one line naming OUT, no file left behind, and the
    same command works once the limit is lifted."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", _limited(100_000), "convert", "taesd", str(out)], capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode == 1 and one_error_line(p.stderr) == (
        f"error: file size limit exceeded while writing {out} (File too large); nothing was half written: free some "
        f"space (or raise the limit) and run the same command again")
    assert list(tmp_path.iterdir()) == []
    assert "wrote taesd:taesd as flax" in run(["convert", "taesd", out], capsys).out


# verify-latents

def test_verify_latents_on_a_folder_that_is_no_output(tmp_path, capsys):
    err = run(["verify-latents", tmp_path], capsys, code=1).err
    assert one_error_line(err) == (f"error: {tmp_path}: not an encode-dataset output (no manifest.json); "
                                   f"encode-dataset writes one when it finishes")
    err = run(["verify-latents", tmp_path / "nothing"], capsys, code=1).err
    assert one_error_line(err) == f"error: {tmp_path / 'nothing'}: no such folder"
    (tmp_path / "job.json").write_text("{}")
    err = run(["verify-latents", tmp_path], capsys, code=1).err
    assert "unfinished encode-dataset job" in one_error_line(err) and "run the same encode-dataset command" in err
    (tmp_path / "manifest.json").write_text("{")
    assert "manifest.json: not valid JSON" in one_error_line(run(["verify-latents", tmp_path], capsys, code=1).err)


# lean imports and extras

def test_the_cli_imports_no_job_dependencies(tmp_path):
    src = image(tmp_path / "in.png", 32, 32)
    code = ("import sys, flax_vae.cli as cli\n"
            "heavy = lambda: {'grain', 'orbax', 'tensorboardX', 'optax'} & {m.split('.')[0] for m in sys.modules}\n"
            "assert not heavy(), heavy()\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert not heavy(), heavy()\n"
            f"cli.main(['reconstruct', {str(src)!r}, '--model', 'taesd', '--out', {str(tmp_path / 'o')!r}])\n"
            "assert not heavy(), heavy()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "PSNR" in p.stdout


@pytest.mark.parametrize("argv, blocked, job, message", [
    (["verify-latents", "{tmp}"], "grain", "flax_vae.encode_dataset",
     'error: verify-latents needs the dataset extra: pip install "flax-vae[dataset]"'),
    (["encode-dataset", "--model", "taesd", "--input", "{tmp}", "--output", "{tmp}/o"], "grain",
     "flax_vae.encode_dataset", 'error: encode-dataset needs the dataset extra: pip install "flax-vae[dataset]"'),
    (["distill", "--help"], "tensorboardX", "flax_vae.train.distill",
     'error: distill needs the train extra: pip install "flax-vae[train]"'),
], ids=["verify-latents", "encode-dataset", "distill"])
def test_a_missing_extra_names_the_fix(monkeypatch, tmp_path, capsys, argv, blocked, job, message):
    monkeypatch.setitem(sys.modules, blocked, None)  # import blocked ... -> ImportError, as if not installed
    for module in (job, "flax_vae.dataset"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    err = run([a.format(tmp=tmp_path) for a in argv], capsys, code=1).err
    assert one_error_line(err).startswith(message) and blocked in err


# distill

def test_distill_help_lists_the_choices(capsys):
    out = " ".join(run(["distill", "--help"], capsys, code=0).out.split())
    from flax_vae.train import students
    assert all(name in out for name in students.PRESETS) and "or a JSON file" in out
    assert "--optimizer {adamw,muon}" in out and "--latents {diffusion,raw}" in out
    err = run(["distill", "--teacher", "taesd", "--data", ".", "--out", "x", "--optimizer", "sgd"], capsys,
              code=2).err
    assert "argument --optimizer: invalid choice" in one_error_line(err)


def test_distill_skips_unreadable_training_images(monkeypatch, tmp_path, capsys):
    from flax_vae.train import distill
    for name in ("c.png", "d.png"):
        image(tmp_path / "train" / name, 48, 48)
    (tmp_path / "train" / "a.png").write_bytes(b"broken")
    (tmp_path / "train" / "b.jpg").write_bytes(b"")
    image(tmp_path / "eval" / "held.png", 48, 48)
    (tmp_path / "tiny.json").write_text(json.dumps({"width": 8, "depth": 1}))

    def stop(*args, **kw):  # past the data, the teacher's targets and the first messages: stop before training
        raise RuntimeError("stopped here")

    monkeypatch.setattr(distill, "SummaryWriter", stop)
    res = run(["distill", "--teacher", "taesd", "--data", tmp_path / "train", "--eval-data", tmp_path / "eval",
               "--student", tmp_path / "tiny.json", "--out", tmp_path / "run", "--crop", "32", "--eval-size", "32",
               "--batch-size", "8", "--pool-size", "8"], capsys, code=1)
    lines = [line for line in res.out.splitlines() if "unreadable" in line]
    assert len(lines) == 1 and lines[0].startswith("skipped 2 unreadable images: a.png (not a readable image: ")
    assert "b.jpg (not a readable image: " in lines[0] and "c.png" not in lines[0]
    assert "; 2 training images, held out: held.png;" in res.out
    assert one_error_line(res.err) == "error: RuntimeError: stopped here (--debug shows the traceback)"
