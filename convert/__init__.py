"""PyTorch and flax-vae checkpoints <-> Flax parameters: one module per family and format."""
import os
import shutil
import tempfile
from pathlib import Path

from . import dcae, kl, native, taesd
from .checkpoint import CHECKPOINT_SUFFIXES, CheckpointError, read_json, read_tensors, write_json, write_safetensors
from .rules import from_flax

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
FORMATS = {"taesd": taesd, "kl": kl, "dcae": dcae}  # family -> its format module
DIFFUSERS_CLASSES = {"AutoencoderTiny": taesd, "AutoencoderKL": kl, "AutoencoderKLFlux2": kl, "AutoencoderDC": dcae}


def load(source=None, *, encoder=None, decoder=None):
    """Any supported checkpoint -> (config, params as numpy in the stored dtype, variant name)."""
    if source is not None and (encoder or decoder):
        raise ValueError("give either a source or encoder=/decoder= files, not both")
    if source is None:
        if not (encoder or decoder):
            raise ValueError("nothing to load: give a source, or encoder= and/or decoder= files")
        return _load_pair({p: f for p, f in (("encoder", encoder), ("decoder", decoder)) if f})
    path = Path(source)
    if path.is_dir():
        if native.is_native(path):
            return native.load(path)
        if (path / "config.json").is_file():
            return _load_diffusers_folder(path)
        return _load_pair(_find_pair(path))
    if path.is_file():
        tensors = read_tensors(path)
        if kl.is_ldm(tensors):
            return kl.from_ldm(tensors, str(path), path.name)
        if dcae.is_mit(tensors):
            return dcae.load_mit(tensors, str(path), str(path))
        if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in tensors):
            return _from_taesd_parts(taesd.split_diffusers_keys(tensors, path), path, hint=path.name)
        part, _ = taesd.detect_part(tensors, str(path))
        return _from_taesd_parts({part: tensors}, path, hint=path.name)
    raise CheckpointError(f"{source}: no such file or folder")


def _load_pair(files):
    parts = {part: read_tensors(f) for part, f in files.items()}
    where = " + ".join(str(f) for f in files.values())
    return _from_taesd_parts(parts, where, hint=" ".join(Path(f).name for f in files.values()))


def _from_taesd_parts(parts, where, hint):
    try:
        config, params = taesd.from_madebyollin(parts, str(where))
    except (ValueError, IndexError, KeyError) as e:
        raise e if isinstance(e, CheckpointError) else CheckpointError(f"{where}: not a TAESD checkpoint: {e}")
    return config, params, taesd.variant_name(config, hint)


def _find_pair(folder):
    files = {}
    for part in taesd.PARTS:
        found = sorted(p for p in folder.iterdir() if part in p.name and p.suffix in CHECKPOINT_SUFFIXES)
        if len(found) > 1:
            raise CheckpointError(f"{folder}: several {part} files, name one with {part}=: "
                                  + ", ".join(p.name for p in found))
        if found:
            files[part] = found[0]
    if not files:
        raise CheckpointError(f"{folder}: no config.json and no *encoder*/*decoder* weight files")
    return files


def _load_diffusers_folder(folder):
    cfg = read_json(folder / "config.json")
    family = DIFFUSERS_CLASSES.get(cfg.get("_class_name"))
    if family is None:
        raise CheckpointError(f"{folder}: unsupported diffusers model {cfg.get('_class_name')!r} "
                              f"(supported: {', '.join(DIFFUSERS_CLASSES)})")
    return family.load_diffusers(cfg, read_tensors(_diffusers_weights(folder)), str(folder), folder.name)


def _diffusers_weights(folder):
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")
    return weights


def export(config, params, out, to="flax", name="custom", overwrite=False):
    """Write a model as `flax` (our format), `diffusers` (the family's diffusers folder) or, for TAESD,
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


def _export_madebyollin(config, params, out, name):
    if config.family != "taesd":
        raise CheckpointError(f"madebyollin format holds TAESD models only, not {config.family}")
    stem = name.split("/")[0]
    for part in (p for p in taesd.PARTS if p in params):
        tensors = from_flax({part: params[part]}, taesd.madebyollin_rules(config, part))
        write_safetensors(out / f"{stem}_{part}.safetensors", tensors, metadata={"format": "pt"})


EXPORTS = {"flax": _export_flax, "diffusers": _export_diffusers, "madebyollin": _export_madebyollin}


__all__ = ["CheckpointError", "load", "export", "read_tensors", "write_safetensors"]
