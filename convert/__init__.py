"""PyTorch and flax-vae checkpoints <-> Flax parameters: one module per family and format."""
from pathlib import Path

from . import dcae, kl, native, taesd
from .checkpoint import CHECKPOINT_SUFFIXES, CheckpointError, read_json, read_tensors, write_json, write_safetensors
from .rules import from_flax

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
FAMILIES = {"taesd": taesd, "kl": kl, "dcae": dcae}
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


def export(config, params, out, to="flax", name="custom"):
    """Write a model as `flax` (our format), `diffusers` (the family's diffusers folder) or, for TAESD,
    `madebyollin` (<name>_encoder.safetensors / <name>_decoder.safetensors in `out`)."""
    out = Path(out)
    parts = [p for p in taesd.PARTS if p in params]
    if to == "flax":
        native.save(out, config, params, name)
    elif to == "diffusers":
        diffusers_config, tensors = FAMILIES[config.family].diffusers_export(config, params)
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / WEIGHT_FILES[0], tensors, metadata={"format": "pt"})
        write_json(out / "config.json", diffusers_config)
    elif to == "madebyollin":
        if config.family != "taesd":
            raise CheckpointError(f"madebyollin format holds TAESD models only, not {config.family}")
        out.mkdir(parents=True, exist_ok=True)
        stem = name.split("/")[0]
        for part in parts:
            tensors = from_flax({part: params[part]}, taesd.madebyollin_rules(config, part))
            write_safetensors(out / f"{stem}_{part}.safetensors", tensors, metadata={"format": "pt"})
    else:
        raise ValueError(f"unknown export format {to!r}: use flax, diffusers or madebyollin")


__all__ = ["CheckpointError", "load", "export", "read_tensors", "write_safetensors"]
