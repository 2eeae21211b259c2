"""kill -9 at random moments, then a rerun: `flax-vae encode-dataset`, `flax-vae convert` and `flax-vae distill`
lose, tear and repeat nothing.

Each kill is one process running the command line (`flax_vae.cli.main`), killed with SIGKILL at a random moment
of its work: a wall-clock delay after it says it is ready (encode-dataset's "<n> images in <m> shards" line,
distill's "from step" line; convert: as it starts). A job's kill moments are drawn uniformly over the time an
uninterrupted run takes, by numpy's default_rng(FLAX_VAE_KILL_SEED) (0 unless set), and taken in order: the first
run is killed at the first moment, the rerun (which resumes) at the next, and so on, then a last run finishes the
job. A kill counts only if the job had not finished (its last line not printed); a run that finishes before its
moment ends the job, and a new job takes the kills left. Assertion messages name the seed, the job and the moment,
to replay a failure. FLAX_VAE_KILLS (10 unless set) is the number of kills per command: FLAX_VAE_KILLS=100 for a
long run.

The processes are forked from a multiprocessing forkserver that has imported flax-vae once (no JAX backend
started yet) and share a persistent compilation cache, so that a kill costs its own work, not seconds of imports
and compiles. The three tests take about 80 s on the 2-core CPU machine.
"""
import itertools
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from safetensors import safe_open

import flax_vae
from flax_vae.autoencoder import Autoencoder
from flax_vae.encode_dataset import read_shard, verify
from flax_vae.family import init_params, module
from flax_vae.images import BUNDLED_PHOTOS

SEED = int(os.environ.get("FLAX_VAE_KILL_SEED", "0"))
KILLS = int(os.environ.get("FLAX_VAE_KILLS", "10"))


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """start(argv) -> (process, its log): the command line in a process forked from a server that has imported
    flax-vae and this module."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["flax_vae.cli", "flax_vae.encode_dataset", "flax_vae.train.distill", __name__])
    cache, logs = tmp_path_factory.mktemp("compilation-cache"), tmp_path_factory.mktemp("logs")
    count = itertools.count()

    def start(argv):
        log = logs / f"{next(count)}.log"
        process = context.Process(target=_command, args=([str(a) for a in argv], str(log), str(cache)))
        process.start()
        return process, log
    return start


def _command(argv, log, cache):
    """In the forked process: output to `log`, the shared compilation cache, the command line."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # read when the backend starts, below
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from flax_vae import cli
    cli.main(argv)


def _run(start, argv, ready="", delay=None) -> tuple[bool, str, float]:
    """Run the command line; with `delay`, SIGKILL it that many seconds after `ready` appears in its output.
    -> (killed, output, seconds from ready to its end)."""
    process, log = start(argv)
    while ready and process.is_alive() and ready not in (log.read_text(errors="replace") if log.exists() else ""):
        time.sleep(0.002)
    t0 = time.monotonic()
    process.join(delay)
    killed = process.is_alive()
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    process.join()
    seconds, output = time.monotonic() - t0, log.read_text(errors="replace") if log.exists() else ""
    assert process.exitcode == (-signal.SIGKILL if killed else 0), output
    return killed, output, seconds


def _reference(start, command, tmp_path, ready, done) -> float:
    """Run command(tmp_path / "reference-0"), then "reference-1", without a kill: the first run fills the
    compilation cache, the second's time from ready to its end (returned) is what the work takes."""
    for n in range(2):
        _, output, seconds = _run(start, command(tmp_path / f"reference-{n}"), ready)
        assert done in output, output
    return seconds


def _kill_at_random_moments(start, command, new_job, ready, done, seconds, after_kill, finished, what):
    """KILLS kills of command(job) at random moments (this module's docstring) over `seconds`, the time the work
    takes after `ready`; new_job() -> a job's folder, after_kill(job, where) checks what each kill left, and
    finished(job, where) a finished job. A kill counts while the job is unfinished (`done` not in the output)."""
    rng, kills = np.random.default_rng(SEED), 0
    for _ in range(KILLS):  # jobs
        job, elapsed = new_job(), 0.0
        for moment in np.sort(rng.uniform(0, seconds, KILLS - kills)):
            where = (f"{what}, FLAX_VAE_KILL_SEED={SEED}, {job.name}: killed {moment:.3f} s into the work, "
                     f"{moment - elapsed:.3f} s after this run was ready")
            killed, output, _ = _run(start, command(job), ready, moment - elapsed)
            if not killed or done in output:
                finished(job, where.replace("killed", "finished before its kill"))
                break
            kills, elapsed = kills + 1, moment
            after_kill(job, where)
        else:
            _run(start, command(job))
            finished(job, f"{what}, FLAX_VAE_KILL_SEED={SEED}, {job.name}: the run after its last kill")
        if kills == KILLS:
            return
    raise AssertionError(f"{what}: only {kills} of {KILLS} kills landed before the job finished")


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """The bundled TAESD in flax-vae's own format, which loads faster (no conversion)."""
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    flax_vae.save(flax_vae.load("taesd"), folder)
    return folder


def _jobs(tmp_path):
    """new_job() -> tmp_path / "job0", "job1", ..."""
    count = itertools.count()
    return lambda: tmp_path / f"job{next(count)}"


# encode-dataset

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Twelve small photographs (shard size 1: twelve units of work) and a damaged file."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(12):
        im = Image.open(BUNDLED_PHOTOS[i % 3]).convert("RGB")
        im.crop((i * 7, i * 5, 200 + i * 7, 160 + i * 5)).resize((80, 64)).save(root / f"{i:02d}.png")
    (root / "damaged.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _latents(output: Path) -> list[tuple[str, np.ndarray]]:
    return [(key, z) for p in sorted(output.glob("latents-*.safetensors")) for g in read_shard(p).values()
            for key, z in zip(g["keys"], g["latents"])]


def test_encode_dataset_killed_at_random_moments(start, photos, taesd, tmp_path):
    """verify-latents passes after the rerun, every image is in it once, with the uninterrupted run's latents;
    after each kill, every file in the folder is whole (only temporary *.partial files can be torn)."""
    argv = ["encode-dataset", "--model", taesd, "--input", photos, "--resolution", "64", "--shard-size", "1",
            "--batch-size", "8", "--threads", "2", "--output"]
    ready, done = "images in 13 shards", "manifest.json written"
    seconds = _reference(start, lambda job: [*argv, job], tmp_path, ready, done)
    reference = dict(_latents(tmp_path / "reference-1"))
    assert len(reference) == 12

    def after_kill(job, where):
        for path in job.iterdir():
            if path.suffix == ".safetensors":
                with safe_open(path, "np") as f:
                    assert f.metadata()["keys"], f"{where}: {path.name}"
            elif path.suffix in (".json", ".jsonl"):  # a record, the job, the manifest; skipped.jsonl, line by line
                text = path.read_text()
                assert [json.loads(t) for t in (text.splitlines() if path.suffix == ".jsonl" else [text])], where

    def finished(job, where):
        manifest, problems = verify(job)
        assert problems == [] and manifest["counts"]["skipped"] == 1, where
        latents = _latents(job)
        assert sorted(key for key, _ in latents) == sorted(reference), where  # each image once
        for key, z in latents:
            np.testing.assert_array_equal(z, reference[key], err_msg=f"{where}: {key}")
        assert not list(job.glob(".*.partial")), where

    _kill_at_random_moments(start, lambda job: [*argv, job], _jobs(tmp_path), ready, done, seconds, after_kill,
                            finished, "encode-dataset")


# convert

def _equal_params(folder: Path, model) -> bool:
    params = flax_vae.load(folder).params
    return jax.tree.structure(params) == jax.tree.structure(model.params) and all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(model.params)))


def test_convert_killed_at_random_moments(start, tmp_path):
    """Half the jobs write a new folder, half replace one that holds another model: after a kill the folder holds
    the old model, the new one, or nothing (between the two renames of a replacement), never a mix or a torn
    file."""
    new, old = flax_vae.load("taesd"), flax_vae.load("taesdxl")
    command, done = (lambda job: ["convert", "taesd", job, "--overwrite"]), "wrote taesd:taesd as flax"
    seconds = _reference(start, command, tmp_path, "", done)
    count = itertools.count()

    def new_job():  # every other job replaces a folder that holds another model
        n = next(count)
        if n % 2:
            flax_vae.save(old, tmp_path / f"job{n}")
        return tmp_path / f"job{n}"

    def after_kill(job, where):
        assert not job.exists() or _equal_params(job, old) or _equal_params(job, new), where

    def finished(job, where):
        assert _equal_params(job, new), where

    _kill_at_random_moments(start, command, new_job, "", done, seconds, after_kill, finished, "convert")


# distill

def _state(run: Path) -> dict:
    """The latest checkpoint, as stored."""
    return ocp.StandardCheckpointer().restore(run / "checkpoints" / str(max(
        int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())) / "default")


def test_distill_killed_at_random_moments(start, tmp_path):
    """The resumed run's final state (parameters, EMA, optimiser state) and export equal an uninterrupted run's,
    bit for bit, whatever moments it was killed at (checkpoints every step). Teacher and student are tiny TAESDs
    (8 channels, one block per stage), so that compiling takes seconds."""
    for folder, paths in (("train", BUNDLED_PHOTOS[:2]), ("eval", BUNDLED_PHOTOS[2:])):
        (tmp_path / folder).mkdir()
        for path in paths:
            Image.open(path).convert("RGB").reduce(4).save(tmp_path / folder / path.name)
    tiny = flax_vae.TAESDConfig(latent_channels=4, width=8, depth=1)
    params = jax.jit(init_params, static_argnums=0)(tiny, jax.random.key(0))
    flax_vae.save(Autoencoder(tiny, module(tiny), params, "tiny"), tmp_path / "teacher")
    (tmp_path / "tiny.json").write_text('{"width": 8, "depth": 1}')
    argv = ["distill", "--teacher", tmp_path / "teacher", "--data", tmp_path / "train", "--eval-data",
            tmp_path / "eval", "--student", tmp_path / "tiny.json", "--parts", "decoder", "--crop", "32",
            "--batch-size", "8", "--pool-size", "8", "--pool-reuse", "2", "--eval-size", "32", "--eval-every", "100",
            "--grid-every", "100", "--checkpoint-every", "1", "--warmup", "1", "--steps", "4", "--out"]
    ready, done = "from step", "export diffusers:"  # not written (a decoder alone), the last line all the same

    def command(job):  # once config.json is written the run exists: --resume continues it
        return [*argv, job, *["--resume"] * (job / "config.json").is_file()]

    seconds = _reference(start, command, tmp_path, ready, done)
    want = _state(tmp_path / "reference-1")
    want_export = flax_vae.load(tmp_path / "reference-1" / "export" / "flax")

    def after_kill(job, where):  # whatever is in place is whole
        assert not (job / "config.json").exists() or json.loads((job / "config.json").read_text()), where
        for export in (job / "export").glob("*"):
            flax_vae.load(export)

    def finished(job, where):
        got = _state(job)
        assert int(got["step"]) == 4, where
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            if path[0].key != "clock":  # seconds of wall and CPU time
                np.testing.assert_array_equal(a, b, err_msg=f"{where}: {jax.tree_util.keystr(path)}")
        assert _equal_params(job / "export" / "flax", want_export), where

    _kill_at_random_moments(start, command, _jobs(tmp_path), ready, done, seconds, after_kill, finished, "distill")
