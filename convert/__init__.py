"""PyTorch and flax-vae checkpoints <-> Flax parameters: one module per family and format."""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from . import dcae, diffusers_flax, kl, native, taesd
from .checkpoint import CheckpointError, read_json, read_tensors, write_json, write_safetensors
from .diffusers_flax import from_diffusers_flax, to_diffusers_flax
from .rules import flatten, from_flax

# A diffusers folder's weights, the first found of these (safetensors, then Flax msgpack, then PyTorch pickles)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                diffusers_flax.WEIGHTS_FILE, "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
FORMATS = {"kl": kl, "dcae": dcae, "taesd": taesd}  # family -> its format module, most specific file format first
DIFFUSERS_CLASSES = {cls: fmt for fmt in FORMATS.values() for cls in fmt.DIFFUSERS_CLASSES}
FLAX_CLASSES = {diffusers_flax.CLASS: diffusers_flax.PYTORCH_CLASS}  # diffusers' Flax class -> the PyTorch one


class FormatModule(Protocol):
    """What a family's format module (convert/<family>.py) provides; registered in FORMATS."""
    DIFFUSERS_CLASSES: tuple[str, ...]  # the diffusers `_class_name`s it reads
    PRESETS: dict  # the model file's presets

    def diffusers_config(self, config) -> dict:
        """config -> diffusers config.json fields (CheckpointError where diffusers cannot express it)."""

    def load_diffusers(self, cfg: dict, tensors: dict, where: str, hint: str) -> tuple:
        """A diffusers folder's config.json dict and tensors -> (config, params, variant name)."""

    def diffusers_export(self, config, params) -> tuple[dict, dict]:
        """-> (config.json dict, PyTorch-layout state dict)."""

    def load_file(self, tensors: dict, path: Path) -> tuple | None:
        """A single checkpoint file's tensors -> (config, params, variant name), or None: not this format."""


def load(source=None, *, encoder=None, decoder=None):
    """Any supported checkpoint -> (config, params as numpy in the stored dtype, variant name).

    source: a flax-vae or diffusers folder, a folder of TAESD *_encoder / *_decoder files, or one file; or the
    TAESD parts as encoder= / decoder= files."""
    config, params, name = _load(source, encoder, decoder)
    _check_finite(params, source if source is not None else " + ".join(str(f) for f in (encoder, decoder) if f))
    return config, params, name


def _check_finite(params, where):
    """NaN or infinite weights are a corrupt file: refused here, rather than found as NaN images later."""
    for path, value in flatten(params).items():
        if not np.isfinite(value).all():
            raise CheckpointError(f"{where}: {path} holds NaN or infinite values (a corrupt file? download it "
                                  "again)")


def _load(source, encoder, decoder):
    if source is not None and (encoder or decoder):
        raise ValueError("give either a source or encoder/decoder files, not both")
    if source is None:
        if not (encoder or decoder):
            raise ValueError("nothing to load: give a source, or encoder and/or decoder files")
        return taesd.load_parts({p: f for p, f in (("encoder", encoder), ("decoder", decoder)) if f})
    path = Path(source)
    if path.is_dir():
        if native.is_native(path):
            return native.load(path)
        if (path / "config.json").is_file():
            return _load_diffusers_folder(path)
        return taesd.load_parts(taesd.find_parts(path))
    if path.is_file():
        tensors = read_tensors(path)
        for fmt in FORMATS.values():
            found = fmt.load_file(tensors, path)
            if found is not None:
                return found
    raise CheckpointError(f"{source}: no such file or folder")


def _load_diffusers_folder(folder):
    cfg = read_json(folder / "config.json")
    cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if isinstance(cls, str) and cls in FLAX_CLASSES:  # the same config fields as the PyTorch class
        cls = FLAX_CLASSES[cls]
        cfg = {**cfg, "_class_name": cls}
    if not isinstance(cls, str) or cls not in DIFFUSERS_CLASSES:
        raise CheckpointError(f"{folder}: unsupported diffusers model {cls!r} "
                              f"(supported: {', '.join([*DIFFUSERS_CLASSES, *FLAX_CLASSES])})")
    fmt = DIFFUSERS_CLASSES[cls]
    _check_json_types(cfg, fmt, f"{folder}/config.json")
    weights = _diffusers_weights(folder)
    try:
        if weights.name == diffusers_flax.WEIGHTS_FILE:
            return diffusers_flax.load_folder(cfg, weights, str(folder), folder.name)
        return fmt.load_diffusers(cfg, read_tensors(weights), str(folder), folder.name)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{folder}/config.json: bad {cls} configuration: {e}") from None


def _kind(value) -> str:
    return ("null" if value is None else "true or false" if isinstance(value, bool) else
            "a number" if isinstance(value, (int, float)) else "a string" if isinstance(value, str) else
            "a list" if isinstance(value, list) else "an object")


def _check_json_types(cfg: dict, fmt, where: str):
    """Each field of a diffusers config.json has the JSON kind that the format writes for the released presets:
    a wrong kind is refused here, naming the field, before any parsing. null is taken where a preset writes
    null (or for shift_factor, which released configs set to null); lists may be one string (DC-AE's per-stage
    types)."""
    written = {}
    for config in fmt.PRESETS.values():
        try:
            for key, value in fmt.diffusers_config(config).items():
                written.setdefault(key, set()).add(_kind(value))
        except CheckpointError:  # a preset diffusers cannot express (taesana)
            continue
    for key, value in cfg.items():
        kinds = written.get(key, set()) | ({"null"} if key == "shift_factor" else set())
        kind = _kind(value)
        if kinds and kind not in kinds and not (kind == "a string" and "a list" in kinds):
            raise CheckpointError(f"{where}: {key}: expected {' or '.join(sorted(kinds))}, got {value!r}")


def _diffusers_weights(folder):
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")
    return weights


def export(config, params, out, to="flax", name="custom", overwrite=False):
    """Write a model as `flax` (our format), `diffusers` (the family's diffusers folder), `diffusers-flax` (a KL
    model as diffusers' FlaxAutoencoderKL folder: config.json + diffusion_flax_model.msgpack) or, for TAESD,
    `madebyollin` (<name>_encoder.safetensors / <name>_decoder.safetensors) into the folder `out`.

    A non-empty `out` is refused unless `overwrite`. The model is written into a temporary sibling folder that
    then takes `out`'s place, so `out` never holds a mix of old and new files, and a failure leaves it as it was."""
    if to not in EXPORTS:
        raise ValueError(f"unknown export format {to!r}: use {', '.join(EXPORTS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: folder is not empty; choose a new folder, or overwrite it (overwrite=True, "
                              "flax-vae convert --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        EXPORTS[to](config, params, staging, name)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(new: Path, old: Path):
    """Put the folder `new` in place of `old` (which may be missing): renames, so `old` is whole at any moment
    but the one between its two renames, when it is briefly absent and its previous contents sit beside it."""
    if not old.exists():
        os.replace(new, old)
        return
    trash = Path(tempfile.mkdtemp(dir=old.parent, prefix=f".{old.name}.", suffix=".old"))
    os.replace(old, trash / old.name)
    os.replace(new, old)
    shutil.rmtree(trash, ignore_errors=True)


def _export_flax(config, params, out, name):
    native.save(out, config, params, name)


def _export_diffusers(config, params, out, name):
    diffusers_config, tensors = FORMATS[config.family].diffusers_export(config, params)
    write_safetensors(out / WEIGHT_FILES[0], tensors, metadata={"format": "pt"})
    write_json(out / "config.json", diffusers_config)


def _export_diffusers_flax(config, params, out, name):
    diffusers_flax.export(config, params, out)


def _export_madebyollin(config, params, out, name):
    if config.family != "taesd":
        raise CheckpointError(f"madebyollin format holds TAESD models only, not {config.family}")
    stem = name.split("/")[0]
    for part in (p for p in taesd.PARTS if p in params):
        tensors = from_flax({part: params[part]}, taesd.madebyollin_rules(config, part))
        write_safetensors(out / f"{stem}_{part}.safetensors", tensors, metadata={"format": "pt"})


EXPORTS = {"flax": _export_flax, "diffusers": _export_diffusers, "diffusers-flax": _export_diffusers_flax,
           "madebyollin": _export_madebyollin}


__all__ = ["CheckpointError", "load", "export", "read_tensors", "write_safetensors", "from_diffusers_flax",
           "to_diffusers_flax"]
