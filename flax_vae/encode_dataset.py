"""Encode a whole image dataset into latent shards, on every local device of every host; resumable.

The output folder:
    job.json                    what is computed (model, preprocessing, the input list's digest): a rerun must
                                match it, so that resumed shards never mix two different jobs
    latents-000012.safetensors  work unit 12, i.e. the items 12 * shard_size ... of the sorted input list.
                                Per image size HxW that occurs in it, tensors "HxW/latents" (N, H/f, W/f, C) float32
                                (the posterior mean, or the encoder's output), "HxW/logvar" and "HxW/samples" (on
                                request), "HxW/original_sizes" (N, 2) int32 (height, width), "HxW/crop_boxes" (N, 4)
                                float32 (top, left, bottom, right in original pixels), "HxW/indices" (N,) int64
                                (positions in the sorted input list); and the metadata entry "keys": JSON
                                {"HxW": [the images' keys, in row order]} (safetensors has no string type)
    latents-000012.json         the unit's record, written after its shard: sha256, counts, skipped inputs
    manifest.json               written when every unit is done: model, config, scaling, preprocessing, counts,
                                every shard with its sha256
    skipped.jsonl               every skipped input, and what could not be searched or read (folders, tar files,
                                links), as {"key": ..., "reason": ...}

Process p of P takes the units u with u % P == p and encodes them on its own devices only: encoding needs no
communication, so no host waits for another's batches; the processes meet once, at the end, before the manifest.
Every file is written under a temporary name and renamed into place, and a unit is done when its record exists and
its shard's sha256 matches the record: a job killed at any moment and run again loses and repeats nothing.
"""
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import time
from collections import deque
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors import safe_open
from tqdm import tqdm

from . import parallel
from .autoencoder import Autoencoder, encode_fn, posterior_fn
from .convert.checkpoint import write_atomic
from .dataset import Loaded, Preprocessing, discover, load_in_parallel
from .images import IMAGE_SUFFIXES, check_writable, printable, writing
from .layers import sample_gaussian
from .loading import load

FORMAT = "flax-vae latents v1"


def shard_name(unit: int) -> str:
    return f"latents-{unit:06d}"


@dataclasses.dataclass(frozen=True)
class Batch:  # up to batch_size images of one unit, all of one size
    unit: int
    rows: list[Loaded]


@dataclasses.dataclass(frozen=True)
class UnitEnd:  # every batch of the unit has been sent before this
    unit: int
    skipped: list[dict]


def encode_dataset(model, input, output, *, resolution=512, buckets=False, bucket_step=64, min_size=None,
                   batch_size=16, shard_size=1024, dtype=jnp.float32, logvar=False, sample=False, seed=0,
                   threads=None, progress=True) -> dict:
    """Encode every image under `input` (a folder, recursive, or a webdataset .tar shard; see flax_vae.dataset)
    into shards in `output` (layout: this module's docstring). Call `jax.distributed.initialize()` first to share
    the work between processes: each runs this with the same arguments.

    model: anything `flax_vae.load` takes (loaded with compute `dtype`), or an `Autoencoder`. resolution: the
    square size (centre mode), or the area of the aspect-ratio buckets (`buckets=True`; sides multiples of
    `bucket_step`). min_size: skip images whose short side is smaller (default resolution // 2). batch_size:
    images per step on this process's devices (a multiple of their count). logvar / sample: also store the
    posterior's log-variance / one sample from it (KL models), drawn with jax.random.fold_in(jax.random.key(seed),
    i) for image i of the sorted list.
    Returns this process's summary; process 0 also writes manifest.json once all processes are done.
    """
    for name, value in dict(resolution=resolution, batch_size=batch_size, shard_size=shard_size,
                            bucket_step=bucket_step).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not Path(input).exists():
        raise ValueError(f"input {printable(input)}: no such file or folder")
    output = Path(output)
    check_writable(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output {printable(output)}: cannot create the folder: {e}") from None
    devices = jax.local_devices()
    if batch_size % len(devices):
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {len(devices)} local devices")

    vae = model if isinstance(model, Autoencoder) else load(model, dtype=dtype)
    _check_model(vae, resolution, buckets, bucket_step, logvar, sample)
    preprocessing = Preprocessing(resolution, buckets, bucket_step, resolution // 2 if min_size is None else min_size)
    items, unreadable = discover(input)
    if not items:
        raise ValueError(f"input {printable(input)}: no images ({', '.join(IMAGE_SUFFIXES)}, or inside .tar files)")
    stored = ["latents"] + ["logvar"] * logvar + ["samples"] * sample
    job = _job(vae, preprocessing, items, shard_size, stored, seed)
    process, processes = jax.process_index(), jax.process_count()
    if process == 0:
        _claim(output, job)
        for stale in output.glob(".*.partial"):  # left behind by a killed run
            stale.unlink()
    if processes > 1:  # every process checks its settings against process 0's, none writes before the clean-up
        multihost_utils.sync_global_devices("flax-vae encode-dataset: job claimed")
        if process != 0:
            _claim(output, job)

    units = -(-len(items) // shard_size)
    mine = range(process, units, processes)
    todo = [u for u in mine if not _unit_done(output, u)]
    work = [(i, items[i]) for u in todo for i in range(u * shard_size, min((u + 1) * shard_size, len(items)))]
    who = f"process {process}: " if processes > 1 else ""
    print(f"{who}{len(items)} images in {units} shards; "
          f"{len(mine) - len(todo)} of this process's {len(mine)} shards already done, encoding {len(work)} images",
          flush=True)
    start = time.perf_counter()
    stats = _run(vae, work, preprocessing, output, batch_size=batch_size, shard_size=shard_size,
                 stored=tuple(stored), seed=seed, threads=threads or os.cpu_count(), progress=progress,
                 desc=f"encoding (process {process}/{processes})" if processes > 1 else "encoding")
    stats["seconds"] = time.perf_counter() - start
    stats.update(shards_written=len(todo), shards_already_done=len(mine) - len(todo))
    print(f"{who}encoded {stats['encoded']} images "
          f"({stats['skipped']} skipped) into {len(todo)} shards in {stats['seconds']:.1f} s: "
          f"{stats['encoded'] / max(stats['seconds'], 1e-9):.1f} images/s; waited {stats['input_wait']:.1f} s for "
          f"images, {stats['device_wait']:.1f} s for the devices; {stats['shards_already_done']} shards were "
          f"already done", flush=True)

    if processes > 1:
        multihost_utils.sync_global_devices("flax-vae encode-dataset: every unit written")
    if process == 0:
        manifest = _write_manifest(output, job, units, unreadable, dict(model=str(model) if isinstance(
            model, (str, os.PathLike)) else vae.name, input=str(input)))
        c = manifest["counts"]
        print(f"{printable(output)}: {c['encoded']} of {c['inputs']} images encoded in {c['shards']} shards, "
              f"{c['skipped']} skipped (listed in skipped.jsonl); manifest.json written", flush=True)
    return stats


def _run(vae, work, preprocessing, output, *, batch_size, shard_size, stored, seed, threads, progress, desc):
    """Load, encode and write the units in `work` ((index, item) pairs in unit order). The next batch is sent to the
    devices before the previous one is fetched, so that copies to the devices, compute and the host's work
    (loading, fetching, writing) overlap."""
    mesh = Mesh(np.array(jax.local_devices()), (parallel.AXIS,))
    params = parallel.replicate(mesh, {"encoder": vae.params["encoder"]})
    stats = dict(encoded=0, skipped=0, input_wait=0.0, device_wait=0.0)
    results = {}  # unit -> [(rows, arrays)] of its finished batches
    bar = tqdm(total=len(work), unit="img", disable=not progress, dynamic_ncols=True, desc=desc)

    def send(batch):
        """Start encoding a batch padded to the fixed batch size (one compilation per image size); returns at once."""
        pixels = np.zeros((batch_size, *batch.rows[0].pixels.shape), np.uint8)
        pixels[:len(batch.rows)] = [r.pixels for r in batch.rows]
        indices = np.zeros(batch_size, np.int32)
        indices[:len(batch.rows)] = [r.index for r in batch.rows]
        return _encode_batch(vae.module, stored, seed, params, parallel.shard_rows(mesh, pixels),
                             parallel.shard_rows(mesh, indices))

    def finish(event, out):
        if isinstance(event, UnitEnd):
            _write_unit(output, event.unit, results.pop(event.unit, []), event.skipped)
            stats["skipped"] += len(event.skipped)
            bar.update(len(event.skipped))
            return
        t0 = time.perf_counter()
        n = len(event.rows)
        arrays = {k: parallel.local_rows(v)[:n] for k, v in out.items()}
        stats["device_wait"] += time.perf_counter() - t0
        if not all(np.isfinite(a).all() for a in arrays.values()):  # on the host: the devices are busy
            _stop_at_non_finite(vae, event, arrays)
        results.setdefault(event.unit, []).append((event.rows, arrays))
        stats["encoded"] += n
        bar.update(n)

    pending = deque()  # (event, its outputs on the devices) in order
    events = _batches(load_in_parallel(work, preprocessing, threads, prefetch=4 * batch_size), batch_size,
                      shard_size)
    while True:
        t0 = time.perf_counter()
        event = next(events, None)
        stats["input_wait"] += time.perf_counter() - t0
        if event is None:
            break
        pending.append((event, send(event) if isinstance(event, Batch) else None))
        while sum(isinstance(e, Batch) for e, _ in pending) > 1 or (pending and isinstance(pending[0][0], UnitEnd)):
            finish(*pending.popleft())
    while pending:
        finish(*pending.popleft())
    bar.close()
    return stats


def _stop_at_non_finite(vae, batch: Batch, arrays: dict):
    """Raise a FloatingPointError naming the batch's first image with a NaN or inf in its stored arrays, before
    its unit's shard is written."""
    finite = np.all([np.isfinite(a).reshape(len(a), -1).all(axis=1) for a in arrays.values()], axis=0)
    bad = [row.key for row, ok in zip(batch.rows, finite) if not ok]
    more = f" (and {len(bad) - 1} more images of its batch)" if len(bad) > 1 else ""
    try:
        vae._nonfinite("encode")
    except FloatingPointError as e:
        raise FloatingPointError(f"{printable(bad[0])}{more}: {e}; stopped before writing {shard_name(batch.unit)} "
                                 f"(the shards written so far are kept): remove or replace the image, or change the "
                                 f"model or dtype, then run again") from None


def _check_model(vae, resolution, buckets, bucket_step, logvar, sample):
    if "encoder" not in vae.params:
        raise ValueError(f"{vae!r} has no encoder")
    f = vae.factor
    if resolution % f or (buckets and bucket_step % f):
        raise ValueError(f"resolution {resolution}{' and bucket step %d' % bucket_step if buckets else ''} must be "
                         f"multiples of the model's factor {f}")
    if buckets and resolution % bucket_step:
        raise ValueError(f"resolution {resolution} must be a multiple of the bucket step {bucket_step}")
    if (logvar or sample) and not vae.config.has_posterior:
        raise ValueError(f"{vae.config.family} encoders are deterministic: no logvar or samples to store")


def _job(vae, preprocessing, items, shard_size, stored, seed) -> dict:
    """Everything the shards' contents depend on (not the batch size, thread or process count: those may change
    between a run and its resumption)."""
    params = hashlib.sha256()
    for leaf in jax.tree.leaves(vae.params["encoder"]):
        params.update(np.asarray(leaf).tobytes())
    keys = hashlib.sha256("\n".join(item.key for item in items).encode("utf-8", "surrogateescape"))
    return dict(format=FORMAT, model=dict(name=vae.name, family=vae.config.family,
                                          config=dataclasses.asdict(vae.config), dtype=jnp.dtype(vae.dtype).name,
                                          encoder_sha256=params.hexdigest()),
                preprocessing=dict(dataclasses.asdict(preprocessing), resample="bicubic",
                                   sizes=preprocessing.sizes),
                inputs=dict(count=len(items), keys_sha256=keys.hexdigest()), shard_size=shard_size,
                stored=stored, seed=seed)


def _claim(output: Path, job: dict):
    """Record the job in output/job.json, or check that the one recorded there is this one."""
    path = output / "job.json"
    job = json.loads(json.dumps(job))  # tuples -> lists, as read back
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != job:
            differ = sorted(k for k in job.keys() | recorded.keys() if job.get(k) != recorded.get(k))
            raise ValueError(f"output {printable(output)} holds a different job (differs in: {', '.join(differ)}); "
                             f"use a new output folder, or the original settings and inputs to resume it")
    else:
        _write(path, json.dumps(job, indent=1).encode())


def _unit_done(output: Path, unit: int) -> bool:
    try:
        record = json.loads((output / f"{shard_name(unit)}.json").read_text())
        return _sha256(output / f"{shard_name(unit)}.safetensors") == record["sha256"]
    except (FileNotFoundError, ValueError, KeyError):  # no record or no shard yet, or either damaged: redo it
        return False


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _encode_batch(module, stored: tuple, seed: int, params, pixels, indices):
    """A full batch of uint8 pixels (and the images' indices) -> the stored arrays, float32, sharded as the batch.
    At module level: one compilation per model, settings and image size serves every run in a process."""
    images = pixels.astype(jnp.float32) / 127.5 - 1
    if not module.config.has_posterior:
        return {"latents": encode_fn(module, params, images).astype(jnp.float32)}
    mean, logvar = posterior_fn(module, params, images)
    out = dict(latents=mean, logvar=logvar)
    if "samples" in stored:  # one key per image: a sample does not depend on batching or devices
        normal = lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), mean.shape[1:], mean.dtype)
        out["samples"] = sample_gaussian(mean, logvar, jax.vmap(normal)(indices))
    return {k: out[k].astype(jnp.float32) for k in stored}


def _batches(loaded, batch_size, shard_size):
    """Loaded images in input order -> Batch and UnitEnd events; a unit's batches hold one image size each, and its
    last, partial batches are sent at the unit's end."""
    for unit, unit_items in itertools.groupby(loaded, lambda x: x.index // shard_size):
        open_batches, skipped = {}, []
        for item in unit_items:
            if item.pixels is None:
                skipped.append({"key": item.key, "reason": item.reason})
                continue
            rows = open_batches.setdefault(item.pixels.shape, [])
            rows.append(item)
            if len(rows) == batch_size:
                yield Batch(unit, open_batches.pop(item.pixels.shape))
        yield from (Batch(unit, rows) for rows in open_batches.values())
        yield UnitEnd(unit, skipped)


def _write_unit(output: Path, unit: int, batches, skipped):
    """The unit's shard, then its record (each atomically)."""
    groups = {}
    for rows, arrays in batches:
        group = groups.setdefault(rows[0].pixels.shape[:2], ([], []))
        group[0].extend(rows)
        group[1].append(arrays)
    tensors, keys = {}, {}
    for (h, w), (rows, arrays) in sorted(groups.items()):
        name = f"{h}x{w}"
        tensors[f"{name}/indices"] = np.array([r.index for r in rows], np.int64)
        tensors[f"{name}/original_sizes"] = np.array([r.original_size for r in rows], np.int32)
        tensors[f"{name}/crop_boxes"] = np.array([r.crop_box for r in rows], np.float32)
        for k in arrays[0]:
            tensors[f"{name}/{k}"] = np.concatenate([a[k] for a in arrays])
        keys[name] = [r.key for r in rows]
    data = safetensors.numpy.save(tensors, {"keys": json.dumps(keys)})  # one entry: its order is fixed
    _write(output / f"{shard_name(unit)}.safetensors", data)
    record = dict(unit=unit, file=f"{shard_name(unit)}.safetensors", sha256=hashlib.sha256(data).hexdigest(),
                  images=sum(len(rows) for rows, _ in groups.values()),
                  sizes={f"{h}x{w}": len(rows) for (h, w), (rows, _) in sorted(groups.items())}, skipped=skipped)
    _write(output / f"{shard_name(unit)}.json", json.dumps(record).encode())


def _write_manifest(output: Path, job: dict, units: int, unreadable: list[dict], sources: dict) -> dict:
    records = []
    for unit in range(units):
        path = output / f"{shard_name(unit)}.json"
        if not path.exists():
            raise RuntimeError(f"{path} is missing after every process finished: run the job again")
        records.append(json.loads(path.read_text()))
    skipped = unreadable + [s for r in records for s in r["skipped"]]
    _write(output / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped).encode())
    config = job["model"]["config"]
    encoded = sum(r["images"] for r in records)
    tars = sum(s["key"].endswith(".tar") for s in unreadable)  # the others: folders, links, unsafe member names
    manifest = dict(job, sources=sources,
                    scaling=dict(scaling_factor=config.get("scaling_factor", 1.0),
                                 shift_factor=config.get("shift_factor", 0.0)),
                    counts=dict(inputs=job["inputs"]["count"], encoded=encoded,
                                skipped=sum(len(r["skipped"]) for r in records),
                                unreadable_tar_files=tars, shards=units),
                    shards=[{k: r[k] for k in ("file", "sha256", "images", "sizes")} for r in records])
    _write(output / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def _write(path: Path, data: bytes):
    with writing(path):
        write_atomic(path, data)


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_shard(path) -> dict[str, dict]:
    """One shard -> {"HxW": {"keys": [...], "latents": array, "original_sizes": ..., ...}} (only safetensors and
    numpy are needed to do the same elsewhere)."""
    groups = {}
    with safe_open(path, "np") as f:
        for name in f.keys():
            size, array = name.split("/")
            groups.setdefault(size, {})[array] = f.get_tensor(name)
        for size, keys in json.loads(f.metadata()["keys"]).items():
            groups.setdefault(size, {})["keys"] = keys
    return groups


def verify(output) -> tuple[dict, list[str]]:
    """Check a finished output folder against its manifest: every shard present with its sha256, its counts and
    each array's row count, every image in the unit it belongs to and in one shard only, the totals.
    Returns (manifest, problems); no problems means it all checks out."""
    output = Path(output)
    if not output.is_dir():
        raise ValueError(f"{output}: no such folder" if not output.exists() else f"{output}: not a folder")
    if not (output / "manifest.json").is_file():
        if (output / "job.json").is_file():
            raise ValueError(f"{output}: an unfinished encode-dataset job (job.json, no manifest.json yet): run the "
                             f"same encode-dataset command again to finish it")
        raise ValueError(f"{output}: not an encode-dataset output (no manifest.json); encode-dataset writes one when "
                         f"it finishes")
    try:
        manifest = json.loads((output / "manifest.json").read_text())
    except ValueError as e:
        raise ValueError(f"{output / 'manifest.json'}: not valid JSON ({e})") from None
    problems, seen = [], set()
    shard_size, stored = manifest["shard_size"], manifest["stored"]
    for unit, shard in enumerate(manifest["shards"]):
        path = output / shard["file"]
        if shard["file"] != f"{shard_name(unit)}.safetensors":
            problems.append(f"shard {unit} is listed as {shard['file']}")
        if not path.exists():
            problems.append(f"{shard['file']}: missing")
            continue
        if (digest := _sha256(path)) != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 {digest} differs from the manifest's {shard['sha256']}")
            continue
        groups = read_shard(path)
        sizes = {size: len(g.get("keys", [])) for size, g in groups.items()}
        if sizes != shard["sizes"]:
            problems.append(f"{shard['file']}: holds {sizes} images per size, the manifest says {shard['sizes']}")
        for size, g in groups.items():
            for name in ["indices", "original_sizes", "crop_boxes", *stored]:
                if name not in g or len(g[name]) != len(g.get("keys", [])):
                    problems.append(f"{shard['file']}: {size}/{name} is missing or has a wrong row count")
            indices = g.get("indices", np.zeros(0, np.int64)).tolist()
            if any(i // shard_size != unit for i in indices):
                problems.append(f"{shard['file']}: holds images of other units")
            if seen.intersection(indices) or len(set(indices)) < len(indices):
                problems.append(f"{shard['file']}: holds images also found elsewhere")
            seen.update(indices)
    counts = manifest["counts"]
    if len(manifest["shards"]) != counts["shards"] or len(seen) != counts["encoded"] or \
            counts["encoded"] + counts["skipped"] != counts["inputs"]:
        problems.append(f"counts do not add up: {len(manifest['shards'])} shards, {len(seen)} images found, "
                        f"manifest counts {counts}")
    return manifest, problems
