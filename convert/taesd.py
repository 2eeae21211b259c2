"""TAESD checkpoint formats.

madebyollin: one file per part, nn.Sequential indices (`0.weight`, `1.conv.0.weight`, ...).
diffusers:   `AutoencoderTiny` - `encoder.layers.{i}` = madebyollin encoder `{i}`, `decoder.layers.{i}` = madebyollin
             decoder `{i+1}` (diffusers applies the decoder's input clamp in forward, not as layer 0).
"""
import contextlib
import functools
import re
from pathlib import Path


from flax_vae.family import param_shapes
from flax_vae.taesd import LATENT_MAGNITUDE, LATENT_SHIFT, PRESETS, TAESDConfig

from .checkpoint import CHECKPOINT_SUFFIXES, CheckpointError, read_tensors
from .rules import Rule, flatten, from_flax, matching_presets, to_flax

PARTS = ("encoder", "decoder")
DIFFUSERS_CLASSES = ("AutoencoderTiny",)

# Per-module tables: madebyollin suffix -> (Flax leaf path, layout). Optional entries (bias, skip,
# pool) are kept only where the model has that parameter.
CONV = {"weight": ("kernel", "conv"), "bias": ("bias", "copy")}
BLOCK = {
    "conv.0.weight": ("conv_0/kernel", "conv"), "conv.0.bias": ("conv_0/bias", "copy"),
    "conv.2.weight": ("conv_1/kernel", "conv"), "conv.2.bias": ("conv_1/bias", "copy"),
    "conv.4.weight": ("conv_2/kernel", "conv"), "conv.4.bias": ("conv_2/bias", "copy"),
    "skip.weight": ("skip/kernel", "conv"),
    "pool.0.weight": ("pool_in/kernel", "conv"),
    "pool.1.weight": ("pool_norm/scale", "copy"), "pool.1.bias": ("pool_norm/bias", "copy"),
    "pool.3.weight": ("pool_out/kernel", "conv"),
}


def sequential_layout(config: TAESDConfig, part: str) -> list[str | None]:
    """The Flax module at each index of madebyollin's nn.Sequential (None: a layer without weights)."""
    stages = range(len(config.decoder_widths) - 1 if part == "decoder" else 3)
    blocks = lambda s: [f"blocks_{s}_{b}" for b in range(config.depth)]
    if part == "encoder":
        stem = ["conv_in_0", None, "conv_in_1", None] if config.factor == 32 else ["conv_in"]
        return stem + ["block_in"] + [m for s in stages for m in [f"down_{s}", *blocks(s)]] + ["conv_out"]
    # decoder: clamp, conv_in, relu, stages of (blocks, upsample, conv), block_out, conv_out
    return [None, "conv_in", None] + [m for s in stages for m in [*blocks(s), None, f"up_{s}"]] + [
        "block_out", "conv_out"]


@functools.lru_cache(maxsize=None)  # tracing the model takes half a second
def expected_shapes(config: TAESDConfig, part: str) -> dict:
    tree = param_shapes(config)
    return {k: v.shape for k, v in flatten(tree[part]).items()}


def madebyollin_rules(config: TAESDConfig, part: str, key_prefix="", index_offset=0, target_prefix=None):
    shapes = expected_shapes(config, part)
    target_prefix = f"{part}/" if target_prefix is None else target_prefix
    rules = []
    for i, module in enumerate(sequential_layout(config, part)):
        if module is None:
            continue
        table = BLOCK if module.startswith("block") else CONV
        for suffix, (leaf, layout) in table.items():
            if f"{module}/{leaf}" in shapes:
                rules.append(Rule(f"{key_prefix}{i + index_offset}.{suffix}", f"{target_prefix}{module}/{leaf}",
                                  layout))
    return rules


def diffusers_rules(config: TAESDConfig, parts=PARTS):
    offsets = {"encoder": 0, "decoder": -1}
    return [r for part in parts for r in madebyollin_rules(config, part, f"{part}.layers.", offsets[part])]


# ---- recognising a layout from tensor shapes (file names are only a hint for the variant's name)

def _by_index(tensors, where):
    layers = {}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if not head.isdigit() or not rest:
            raise CheckpointError(f"{where}: {key!r} is not a madebyollin TAESD key (expected '<index>.<name>')")
        layers.setdefault(int(head), {})[rest] = value
    return layers


def detect_part(tensors, where="checkpoint") -> tuple[str, TAESDConfig]:
    """(part, config) of a madebyollin-format state dict, from its shapes alone."""
    layers = _by_index(tensors, where)
    first, last = layers[min(layers)], layers[max(layers)]
    if "weight" not in first or "weight" not in last:
        raise CheckpointError(f"{where}: does not look like a TAESD encoder or decoder")
    blocks = [i for i in sorted(layers) if "conv.0.weight" in layers[i]]
    width = lambda i: layers[i]["conv.0.weight"].shape[0]
    runs = [len(list(g)) for g in _runs(blocks)]
    gn = any("pool.0.weight" in layers[i] for i in blocks)
    if first["weight"].shape[1] == 3:  # an encoder starts from RGB
        f32 = 1 not in layers  # index 1 is the stem's ReLU in the 32x layout, a Block in the classic one
        config = TAESDConfig(latent_channels=last["weight"].shape[0], factor=32 if f32 else 8,
                             width=width(blocks[0]), depth=runs[1] if len(runs) > 1 else 0, midblock_gn=gn)
        return "encoder", config
    if last["weight"].shape[0] == 3:  # a decoder ends in RGB
        stages = len(runs) - 1
        config = TAESDConfig(latent_channels=first["weight"].shape[1], factor=2 ** stages,
                             width=width(blocks[-1]), depth=runs[0], midblock_gn=gn)
        return "decoder", config
    raise CheckpointError(f"{where}: neither an encoder (first conv takes 3 channels) nor a decoder "
                          "(last conv gives 3 channels)")


def _runs(indices):
    run = []
    for i in indices:
        if run and i != run[-1] + 1:
            yield run
            run = []
        run.append(i)
    if run:
        yield run


def variant_name(config: TAESDConfig, hint: str = "") -> str:
    """The preset name(s) this architecture matches; a file-name hint picks among equal architectures."""
    return "/".join(matching_presets(PRESETS, config, hint)) or "custom"


def merge_configs(found: dict, where: str) -> TAESDConfig:
    configs = set(found.values())
    if len(configs) != 1:
        raise CheckpointError(f"{where}: encoder and decoder do not belong together: " +
                              "; ".join(f"{p}: {c}" for p, c in found.items()))
    return configs.pop()


def from_madebyollin(parts: dict[str, dict], where: str, config: TAESDConfig | None = None):
    """{'encoder': tensors, 'decoder': tensors} (either may be absent) -> (config, params).

    Without a config, the architecture is recognised from the tensors' shapes."""
    if config is None:
        detected = {}
        for name, tensors in parts.items():
            part, detected[name] = detect_part(tensors, f"{where} ({name})")
            if part != name:
                raise CheckpointError(f"{where}: the {name} file holds a TAESD {part}")
        config = merge_configs(detected, where)
    params = {}
    for part, tensors in parts.items():
        shapes = {f"{part}/{k}": v for k, v in expected_shapes(config, part).items()}
        params.update(to_flax(tensors, madebyollin_rules(config, part), shapes, f"{where} ({part})"))
    return config, params


def split_diffusers_keys(tensors, where) -> dict[str, dict]:
    """diffusers keys -> madebyollin keys per part."""
    parts = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
        if not m:
            raise CheckpointError(f"{where}: unexpected key {key!r} for an AutoencoderTiny")
        part, index, rest = m.groups()
        parts.setdefault(part, {})[f"{int(index) + (part == 'decoder')}.{rest}"] = value
    return parts


# ---- diffusers config.json

def diffusers_config(config: TAESDConfig) -> dict:
    if not diffusers_can_express(config):
        raise CheckpointError(diffusers_limit_message(config))
    w, d = config.width, config.depth
    return {
        "_class_name": "AutoencoderTiny", "in_channels": 3, "out_channels": 3,
        "encoder_block_out_channels": [w] * 4, "decoder_block_out_channels": [w] * 4,
        "num_encoder_blocks": [1, d, d, d], "num_decoder_blocks": [d, d, d, 1],
        "latent_channels": config.latent_channels, "act_fn": "relu", "upsample_fn": "nearest",
        "upsampling_scaling_factor": 2, "latent_magnitude": LATENT_MAGNITUDE, "latent_shift": LATENT_SHIFT, "force_upcast": False,
        "scaling_factor": config.scaling_factor, "shift_factor": config.shift_factor,
    }


def config_from_diffusers(cfg: dict, where: str) -> TAESDConfig:
    widths = set(cfg.get("encoder_block_out_channels", [64] * 4)) | set(cfg.get("decoder_block_out_channels",
                                                                                 [64] * 4))
    enc_blocks = list(cfg.get("num_encoder_blocks", [1, 3, 3, 3]))
    dec_blocks = list(cfg.get("num_decoder_blocks", [3, 3, 3, 1]))
    d = dec_blocks[0]
    supported = (len(widths) == 1 and enc_blocks == [1, d, d, d] and dec_blocks == [d, d, d, 1]
                 and cfg.get("act_fn", "relu") == "relu" and cfg.get("upsample_fn", "nearest") == "nearest"
                 and cfg.get("upsampling_scaling_factor", 2) == 2)
    if not supported:
        raise CheckpointError(f"{where}: unsupported AutoencoderTiny configuration (need equal widths, "
                              f"blocks [1, d, d, d] / [d, d, d, 1], relu, nearest 2x): {cfg}")
    return TAESDConfig(latent_channels=cfg.get("latent_channels", 4), width=widths.pop(), depth=d,
                       scaling_factor=float(cfg.get("scaling_factor", 1.0)),
                       shift_factor=float(cfg.get("shift_factor", 0.0) or 0.0))


def load_diffusers(cfg: dict, tensors: dict, where: str, hint: str = ""):
    """A diffusers AutoencoderTiny (config.json dict + tensors) -> (config, params, variant name)."""
    config = config_from_diffusers(cfg, where)
    _, params = from_madebyollin(split_diffusers_keys(tensors, where), where, config)
    return config, params, variant_name(config, hint)


def diffusers_export(config: TAESDConfig, params) -> tuple[dict, dict]:
    """(config.json dict, state dict) of a diffusers AutoencoderTiny."""
    if not diffusers_can_express(config):
        raise CheckpointError(diffusers_limit_message(config))
    if set(params) != set(PARTS):
        raise CheckpointError("a diffusers AutoencoderTiny needs both encoder and decoder")
    return diffusers_config(config), from_flax(params, diffusers_rules(config))


def diffusers_can_express(config: TAESDConfig) -> bool:
    return config.factor == 8 and not config.midblock_gn


def diffusers_limit_message(config: TAESDConfig) -> str:
    why = ("the mid-block GroupNorm branch (taef2)" if config.midblock_gn else "the 32x layout (taesana)")
    return (f"diffusers' AutoencoderTiny cannot express {why}; export to madebyollin format "
            "(--to madebyollin) or flax-vae format (--to flax) instead")


# ---- files: madebyollin's part files, diffusers' single-file AutoencoderTiny

def load_file(tensors: dict, path: Path):
    """A single file: a diffusers AutoencoderTiny state dict, or one madebyollin part (the fallback format:
    a CheckpointError where the tensors are not TAESD's either)."""
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in tensors):
        return _from_parts(split_diffusers_keys(tensors, path), path, hint=path.name)
    with _not_taesd(path):
        part, _ = detect_part(tensors, str(path))
    return _from_parts({part: tensors}, path, hint=path.name)


def load_parts(files: dict):
    """{"encoder": file, "decoder": file} (either may be absent) -> (config, params, variant name)."""
    parts = {part: read_tensors(f) for part, f in files.items()}
    where = " + ".join(str(f) for f in files.values())
    return _from_parts(parts, where, hint=" ".join(Path(f).name for f in files.values()))


def find_parts(folder: Path) -> dict:
    """The *encoder* / *decoder* checkpoint files of a folder."""
    files = {}
    for part in PARTS:
        found = sorted(p for p in folder.iterdir() if part in p.name and p.suffix in CHECKPOINT_SUFFIXES)
        if len(found) > 1:
            raise CheckpointError(f"{folder}: several {part} files, name the one to use: "
                                  + ", ".join(p.name for p in found))
        if found:
            files[part] = found[0]
    if not files:
        raise CheckpointError(f"{folder}: no config.json and no *encoder*/*decoder* weight files")
    return files


def _from_parts(parts, where, hint):
    with _not_taesd(where):
        config, params = from_madebyollin(parts, str(where))
    return config, params, variant_name(config, hint)


@contextlib.contextmanager
def _not_taesd(where):
    """Tensors that are not TAESD's fail the shape reading (a missing layer, a vector where a conv should be):
    one CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, IndexError, KeyError) as e:
        raise CheckpointError(f"{where}: not a TAESD checkpoint: {e}") from None
