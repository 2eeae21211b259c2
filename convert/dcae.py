"""DC-AE checkpoint formats.

diffusers: `AutoencoderDC` (config.json + diffusion_pytorch_model.safetensors). Its to_q / to_k / to_v are
           the three thirds of the original fused qkv projection (not per-head queries/keys/values): we
           concatenate them into one pseudo-key `...attn.to_qkv.weight` on load and cut it again on export.
mit:       the original MIT-HAN layout (efficientvit `DCAE`, single file): `encoder.project_in`,
           `stages.{i}.op_list.{j}`, `context_module` (attention, fused `qkv` as a 1x1 conv),
           `local_module` (GLU MBConv), `project_out`. Its attention projections are 1x1 convs, diffusers' Linear.
Both: BatchNorm `num_batches_tracked` counters are training state; they are dropped on load.
"""
import dataclasses
import functools
from pathlib import Path

import numpy as np

from flax_vae.dcae import PRESETS, DCAEConfig
from flax_vae.family import param_shapes

from .checkpoint import CheckpointError
from .rules import LAYOUTS, Rule, flatten, from_flax, matching_presets, to_flax

IGNORED_SUFFIX = ".num_batches_tracked"
DIFFUSERS_CLASSES = ("AutoencoderDC",)
QKV_PARTS = ("to_q", "to_k", "to_v")

# One row per parameter: (diffusers suffix, MIT suffix, Flax leaf, layout).
CONV = [("weight", "weight", "kernel", "conv"), ("bias", "bias", "bias", "copy")]
CONV_NOBIAS = CONV[:1]
NORMS = {
    "rms": [("weight", "weight", "scale", "copy"), ("bias", "bias", "bias", "copy")],
    "bn": [("weight", "weight", "scale", "copy"), ("bias", "bias", "bias", "copy"),
           ("running_mean", "running_mean", "mean", "copy"), ("running_var", "running_var", "var", "copy")],
}


def _rows(diff, mit, flax, table):
    return [(f"{diff}.{d}", f"{mit}.{m}", f"{flax}/{leaf}", layout) for d, m, leaf, layout in table]


def _block_rows(kind, scales, norm, diff, mit, flax):
    if kind == "res":
        return (_rows(f"{diff}.conv1", f"{mit}.main.conv1.conv", f"{flax}/conv1", CONV)
                + _rows(f"{diff}.conv2", f"{mit}.main.conv2.conv", f"{flax}/conv2", CONV_NOBIAS)
                + _rows(f"{diff}.norm", f"{mit}.main.conv2.norm", f"{flax}/norm", NORMS[norm]))
    att, mla = f"{mit}.context_module.main", f"{mit}.local_module.main"
    rows = [(f"{diff}.attn.to_qkv.weight", f"{att}.qkv.conv.weight", f"{flax}/attn/qkv/kernel", "linear")]
    for s in range(len(scales)):
        rows += [(f"{diff}.attn.to_qkv_multiscale.{s}.proj_in.weight", f"{att}.aggreg.{s}.0.weight",
                  f"{flax}/attn/aggreg_{s}_dw/kernel", "conv"),
                 (f"{diff}.attn.to_qkv_multiscale.{s}.proj_out.weight", f"{att}.aggreg.{s}.1.weight",
                  f"{flax}/attn/aggreg_{s}_pw/kernel", "conv")]
    return (rows + [(f"{diff}.attn.to_out.weight", f"{att}.proj.conv.weight", f"{flax}/attn/proj/kernel", "linear")]
            + _rows(f"{diff}.attn.norm_out", f"{att}.proj.norm", f"{flax}/attn/norm", NORMS[norm])
            + _rows(f"{diff}.conv_out.conv_inverted", f"{mla}.inverted_conv.conv", f"{flax}/ffn/inverted", CONV)
            + _rows(f"{diff}.conv_out.conv_depth", f"{mla}.depth_conv.conv", f"{flax}/ffn/depth", CONV)
            + _rows(f"{diff}.conv_out.conv_point", f"{mla}.point_conv.conv", f"{flax}/ffn/point", CONV_NOBIAS)
            + _rows(f"{diff}.conv_out.norm", f"{mla}.point_conv.norm", f"{flax}/ffn/norm", NORMS["rms"]))


def parameter_rows(c: DCAEConfig):
    """Every parameter of the model: (diffusers key, MIT key, Flax path, layout). The layout is the
    diffusers one; `mit_rules` reads the attention projections as 1x1 convs."""
    # The encoder stem and the decoder head are a plain conv, or a down/up block when the first stage is empty.
    stem = "" if c.encoder_depths[0] else ".conv"
    unshuffle = c.downsample == "pixel_unshuffle"  # MIT's conv + pixel-unshuffle layer wraps its conv once more
    mit_stem = ".conv" if c.encoder_depths[0] == 0 and unshuffle else ""
    head = "" if c.decoder_depths[0] else ".conv"
    rows = _rows(f"encoder.conv_in{stem}", f"encoder.project_in{mit_stem}.conv",
                 f"encoder/conv_in{stem.replace('.', '/')}", CONV)
    n = len(c.encoder_widths)
    for i, depth in enumerate(c.encoder_depths):
        for j in range(depth):
            rows += _block_rows(c.encoder_blocks[i], c.encoder_scales[i], "rms", f"encoder.down_blocks.{i}.{j}",
                                f"encoder.stages.{i}.op_list.{j}", f"encoder/stage{i}_block{j}")
        if depth and i < n - 1:
            rows += _rows(f"encoder.down_blocks.{i}.{depth}.conv",
                          f"encoder.stages.{i}.op_list.{depth}.main.conv" + (".conv" if unshuffle else ""),
                          f"encoder/stage{i}_down/conv", CONV)
    rows += _rows("encoder.conv_out", "encoder.project_out.main.op_list.0.conv", "encoder/conv_out", CONV)
    rows += _rows("decoder.conv_in", "decoder.project_in.main.conv", "decoder/conv_in", CONV)
    for i, depth in enumerate(c.decoder_depths):
        up = int(bool(depth) and i < n - 1)
        if up:
            rows += _rows(f"decoder.up_blocks.{i}.0.conv", f"decoder.stages.{i}.op_list.0.main.conv.conv",
                          f"decoder/stage{i}_up/conv", CONV)
        for j in range(depth):
            rows += _block_rows(c.decoder_blocks[i], c.decoder_scales[i], c.decoder_norms[i],
                                f"decoder.up_blocks.{i}.{j + up}", f"decoder.stages.{i}.op_list.{j + up}",
                                f"decoder/stage{i}_block{j}")
    rows += _rows("decoder.norm_out", "decoder.project_out.op_list.0", "decoder/norm_out", NORMS["rms"])
    rows += _rows(f"decoder.conv_out{head}", f"decoder.project_out.op_list.2.conv{head}",
                  f"decoder/conv_out{head.replace('.', '/')}", CONV)
    return rows


def diffusers_rules(config: DCAEConfig):
    return [Rule(d, f, layout) for d, _, f, layout in parameter_rows(config)]


def mit_rules(config: DCAEConfig):
    return [Rule(m, f, "conv1x1_dense" if layout == "linear" else layout) for _, m, f, layout in parameter_rows(config)]


@functools.lru_cache(maxsize=16)  # tracing a full f128c512 takes seconds; configs are hashable
def expected_shapes(config: DCAEConfig) -> dict:
    return {k: v.shape for k, v in flatten(param_shapes(config)).items()}


# ---- tensor-level differences between the formats and our parameters

def _drop_counters(tensors):
    return {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIX)}


def fuse_qkv(tensors):
    """diffusers to_q/to_k/to_v -> one `to_qkv` pseudo-key (left alone unless all three are present)."""
    out = dict(tensors)
    for key in tensors:
        if key.endswith(".to_q.weight"):
            stem = key[: -len(".to_q.weight")]
            parts = [f"{stem}.{p}.weight" for p in QKV_PARTS]
            if all(p in out for p in parts):
                out[f"{stem}.to_qkv.weight"] = np.concatenate([out.pop(p) for p in parts], axis=0)
    return out


def split_qkv(tensors):
    out = {}
    for key, value in tensors.items():
        if key.endswith(".to_qkv.weight"):
            stem = key[: -len(".to_qkv.weight")]
            out.update({f"{stem}.{p}.weight": np.ascontiguousarray(t)
                        for p, t in zip(QKV_PARTS, np.split(value, 3, axis=0))})
        else:
            out[key] = value
    return out


def from_diffusers(tensors, config: DCAEConfig, where="checkpoint"):
    return to_flax(fuse_qkv(_drop_counters(tensors)), diffusers_rules(config), expected_shapes(config), where)


def to_diffusers(params, config: DCAEConfig):
    return split_qkv(from_flax(params, diffusers_rules(config)))


def is_mit(tensors) -> bool:
    return any(k.startswith(("encoder.project_in.", "decoder.project_in.")) for k in tensors)


def _architecture(config: DCAEConfig) -> DCAEConfig:
    return dataclasses.replace(config, scaling_factor=1.0, shift_factor=0.0)


def from_mit(tensors, where="checkpoint", config: DCAEConfig | None = None):
    """MIT-layout state dict -> (config, params). Without a config, the released architecture whose
    parameter names and shapes match is used; the file holds no scaling factor (see `with_released_scaling`).
    A file matching none is reported against the closest one, naming the keys and shapes that differ."""
    tensors = _drop_counters(tensors)
    if config is None:
        config = max(dict.fromkeys(_architecture(p) for p in PRESETS.values()), key=lambda a: _fit(tensors, a))
        where = (f"{where} (compared with the closest released architecture, {'/'.join(variant_names(config))}; "
                 "for others call convert.dcae.from_mit(tensors, config=...))")
    return config, to_flax(tensors, mit_rules(config), expected_shapes(config), where)


def _fit(tensors, config):
    """(keys in common, shapes in common) between a state dict and an architecture's MIT layout."""
    shapes = expected_shapes(config)
    common = [r for r in mit_rules(config) if r.source in tensors]
    return len(common), sum(tensors[r.source].shape == _source_shape(r, shapes[r.target]) for r in common)


def _source_shape(rule, flax_shape):
    return tuple(LAYOUTS[rule.layout][1](np.empty(flax_shape, np.int8)).shape)


def variant_names(config: DCAEConfig, hint: str = "") -> list[str]:
    """The released variants with this architecture; a hint (a path, a hub name) picks among them."""
    return matching_presets(PRESETS, config, hint, lambda a, b: _architecture(a) == _architecture(b))


def with_released_scaling(config: DCAEConfig, names: list[str]) -> DCAEConfig:
    """The scaling factor of the named variants when they agree on one (MIT files do not store it);
    otherwise (in and mix share an architecture) the config is left at 1.0."""
    scales = {PRESETS[n].scaling_factor for n in names}
    return dataclasses.replace(config, scaling_factor=scales.pop()) if len(scales) == 1 else config


# ---- diffusers config.json

BLOCK_NAMES = {"res": "ResBlock", "vit": "EfficientViTBlock"}
NORM_NAMES = {"rms": "rms_norm", "bn": "batch_norm"}
# diffusers -> ours. diffusers takes any downsample name but "pixel_unshuffle" for a strided conv: hub configs
# say "Conv", its conversion script "conv".
DOWNSAMPLE_TYPES = {"pixel_unshuffle": "pixel_unshuffle", "Conv": "conv", "conv": "conv"}
UPSAMPLE_TYPES = {"pixel_shuffle": "pixel_shuffle", "interpolate": "interpolate"}
# AutoencoderDC's defaults for keys a config.json may leave out.
DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
    "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "pixel_shuffle", "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "encoder_out_shortcut": True,
    "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu", "scaling_factor": 1.0,
}


def config_from_diffusers(cfg: dict, where: str) -> DCAEConfig:
    cfg = {**DIFFUSERS_DEFAULTS, **cfg}
    n = len(cfg["encoder_block_out_channels"])
    per_stage = lambda v: [v] * n if isinstance(v, str) else list(v)
    inverse = lambda table, names, what: [_lookup({v: k for k, v in table.items()}, x, what, where) for x in names]
    fixed = {"in_channels": 3, "encoder_out_shortcut": True, "decoder_in_shortcut": True}
    unsupported = {k: cfg[k] for k, v in fixed.items() if cfg[k] != v}
    if unsupported:
        raise CheckpointError(f"{where}: unsupported AutoencoderDC configuration: {unsupported}")
    blocks = {part: inverse(BLOCK_NAMES, per_stage(cfg[f"{part}_block_types"]), "block type")
              for part in ("encoder", "decoder")}
    scales = {part: _attention_scales(blocks[part], cfg[f"{part}_qkv_multiscales"])
              for part in ("encoder", "decoder")}
    try:
        return DCAEConfig(
            latent_channels=cfg["latent_channels"], head_dim=cfg["attention_head_dim"],
            encoder_widths=cfg["encoder_block_out_channels"], decoder_widths=cfg["decoder_block_out_channels"],
            encoder_depths=cfg["encoder_layers_per_block"], decoder_depths=cfg["decoder_layers_per_block"],
            encoder_blocks=blocks["encoder"], decoder_blocks=blocks["decoder"],
            encoder_scales=scales["encoder"], decoder_scales=scales["decoder"],
            decoder_norms=inverse(NORM_NAMES, per_stage(cfg["decoder_norm_types"]), "norm type"),
            decoder_acts=per_stage(cfg["decoder_act_fns"]), decoder_out_act=cfg["decoder_conv_act_fn"],
            downsample=_lookup(DOWNSAMPLE_TYPES, cfg["downsample_block_type"], "downsample_block_type", where),
            upsample=_lookup(UPSAMPLE_TYPES, cfg["upsample_block_type"], "upsample_block_type", where),
            scaling_factor=float(cfg["scaling_factor"]))
    except ValueError as e:
        raise CheckpointError(f"{where}: unsupported AutoencoderDC configuration: {e}") from None


def _attention_scales(blocks, scales):
    """Multi-scale kernels of EfficientViT stages only: diffusers' default names (5,) for stages that may hold
    residual blocks (the lite decoder), which have no attention. Unequal lengths are left for DCAEConfig to report."""
    return [s if b == "vit" else () for b, s in zip(blocks, scales)] if len(blocks) == len(scales) else scales


def _lookup(table, key, what, where):
    if key not in table:
        raise CheckpointError(f"{where}: unsupported {what} {key!r} (supported: {', '.join(table)})")
    return table[key]


def diffusers_config(c: DCAEConfig) -> dict:
    if c.shift_factor:
        raise CheckpointError("diffusers' AutoencoderDC has no shift_factor; this model's is "
                              f"{c.shift_factor}")
    return {
        "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": c.latent_channels,
        "attention_head_dim": c.head_dim,
        "encoder_block_types": [BLOCK_NAMES[b] for b in c.encoder_blocks],
        "decoder_block_types": [BLOCK_NAMES[b] for b in c.decoder_blocks],
        "encoder_block_out_channels": list(c.encoder_widths), "decoder_block_out_channels": list(c.decoder_widths),
        "encoder_layers_per_block": list(c.encoder_depths), "decoder_layers_per_block": list(c.decoder_depths),
        "encoder_qkv_multiscales": [list(s) for s in c.encoder_scales],
        "decoder_qkv_multiscales": [list(s) for s in c.decoder_scales],
        "downsample_block_type": "Conv" if c.downsample == "conv" else c.downsample,
        "upsample_block_type": c.upsample,
        "decoder_norm_types": [NORM_NAMES[x] for x in c.decoder_norms], "decoder_act_fns": list(c.decoder_acts),
        "encoder_out_shortcut": True, "decoder_in_shortcut": True, "decoder_conv_act_fn": c.decoder_out_act,
        "scaling_factor": c.scaling_factor,
    }


# ---- entry points for convert.load / convert.export

def load_diffusers(cfg: dict, tensors: dict, where: str, hint: str):
    """A diffusers AutoencoderDC (config.json dict + tensors) -> (config, params, variant name)."""
    config = config_from_diffusers(cfg, where)
    params = from_diffusers(tensors, config, where)
    return config, params, "/".join(variant_names(config, f"{hint} {cfg.get('_name_or_path', '')}")) or "custom"


def load_file(tensors: dict, path: Path):
    """An original MIT-HAN single file -> (config, params, variant name), else None; its path names the
    variant."""
    if not is_mit(tensors):
        return None
    config, params = from_mit(tensors, str(path))
    names = variant_names(config, str(path))
    return with_released_scaling(config, names), params, "/".join(names)


def diffusers_export(config: DCAEConfig, params) -> tuple[dict, dict]:
    """(config.json dict, state dict) of a diffusers AutoencoderDC."""
    if set(params) != {"encoder", "decoder"}:
        raise CheckpointError("a diffusers AutoencoderDC needs both encoder and decoder")
    return diffusers_config(config), to_diffusers(params, config)
