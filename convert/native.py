"""flax-vae's own format: config.json + params.safetensors (flat "/"-joined Flax paths, stored dtype kept)."""
import dataclasses
import functools
from pathlib import Path

from flax_vae.family import FAMILIES, param_shapes

from .checkpoint import CheckpointError, read_json, read_tensors, write_json, write_safetensors
from .rules import Rule, flatten, to_flax

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
    if meta.get("version") != VERSION or not isinstance(meta.get("family"), str) or meta["family"] not in FAMILIES:
        raise CheckpointError(f"{folder}: unsupported flax-vae format version {meta.get('version')} "
                              f"or family {meta.get('family')!r}")
    try:
        config = FAMILIES[meta["family"]].Config(**meta["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}/config.json: bad config: {e}") from None
    name = meta.get("name", "custom")
    if not isinstance(name, str):
        raise CheckpointError(f"{folder}/config.json: name: expected a string, got {type(name).__name__}")
    return config, _params(read_tensors(folder / PARAMS_FILE), config, folder / PARAMS_FILE), name


def _params(tensors, config, where):
    """The parameter tree of `tensors`, strictly `config`'s: every key one of its parameters, with its shape. Either
    the encoder or the decoder may be absent (a model saved without it), nothing else."""
    shapes = _shapes(config)
    sides = {"encoder", "decoder"}
    absent = sides - {key.split("/")[0] for key in tensors}
    expected = {k: v for k, v in shapes.items() if absent == sides or k.split("/")[0] not in absent}
    return to_flax(tensors, [Rule(k, k) for k in expected], expected, str(where))


@functools.lru_cache(maxsize=None)
def _shapes(config) -> dict:
    return {k: tuple(v.shape) for k, v in flatten(param_shapes(config)).items()}
