"""flax-vae's own format: config.json + params.safetensors (flat "/"-joined Flax paths, stored dtype kept)."""
import dataclasses
from pathlib import Path

from flax_vae.family import FAMILIES

from .checkpoint import CheckpointError, read_json, read_tensors, write_json, write_safetensors
from .rules import flatten, unflatten

FORMAT, VERSION = "flax-vae", 1
PARAMS_FILE = "params.safetensors"


def is_native(folder) -> bool:
    cfg = Path(folder) / "config.json"
    return cfg.is_file() and read_json(cfg).get("format") == FORMAT


def save(folder, config, params, name):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / PARAMS_FILE, flatten(params), metadata={"format": FORMAT})
    write_json(folder / "config.json", {"format": FORMAT, "version": VERSION, "family": config.family,
                                        "name": name, "config": dataclasses.asdict(config)})


def load(folder):
    folder = Path(folder)
    meta = read_json(folder / "config.json")
    if meta.get("version") != VERSION or meta.get("family") not in FAMILIES:
        raise CheckpointError(f"{folder}: unsupported flax-vae format version {meta.get('version')} "
                              f"or family {meta.get('family')!r}")
    try:
        config = FAMILIES[meta["family"]].Config(**meta["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}/config.json: bad config: {e}") from None
    return config, unflatten(read_tensors(folder / PARAMS_FILE)), meta.get("name", "custom")
