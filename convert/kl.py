"""AutoencoderKL checkpoint formats.

diffusers: `AutoencoderKL` / `AutoencoderKLFlux2` folders (config.json + diffusion_pytorch_model[.fp16].safetensors
           or .bin): `encoder.down_blocks.{i}.resnets.{j}`, `...mid_block.attentions.0.to_q` (Linear), `quant_conv`.
LDM:       the original single files (CompVis/Stability/BFL): `encoder.down.{i}.block.{j}`, `encoder.mid.attn_1.q`
           (a 1x1 conv), `decoder.up.{k}` indexed by resolution level (k = n - 1 - i for diffusers' up block i),
           `nin_shortcut`, `norm_out`; prefixed by `first_stage_model.` or `vae.` inside full model checkpoints,
           bare in VAE-only files (vae-ft-mse-840000-ema-pruned, FLUX's ae.safetensors: no quant convs).
FLUX.2 stores its latent BatchNorm as `bn.running_mean` / `bn.running_var` (+ `bn.num_batches_tracked`, a training
counter without effect on inference: read and dropped, written back as 0).
"""
import dataclasses
import functools
import re
from pathlib import Path

import numpy as np

from flax_vae.family import param_shapes
from flax_vae.kl import PRESETS, KLConfig

from .checkpoint import CheckpointError
from .rules import Rule, flatten, from_flax, matching_presets, to_flax

DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")
LDM_PREFIXES = ("first_stage_model.", "vae.")
BN_COUNTER = "bn.num_batches_tracked"

# Leaf tables per kind of module: PyTorch suffix -> (Flax leaf, layout).
CONV = {"weight": ("kernel", "conv"), "bias": ("bias", "copy")}
NORM = {"weight": ("scale", "copy"), "bias": ("bias", "copy")}
LINEAR = {"weight": ("kernel", "linear"), "bias": ("bias", "copy")}
CONV1X1 = {"weight": ("kernel", "conv1x1_dense"), "bias": ("bias", "copy")}  # LDM stores attention as 1x1 convs
BN = {"running_mean": ("mean", "copy"), "running_var": ("var", "copy")}


def _modules(config: KLConfig, ldm: bool):
    """(PyTorch module name, Flax module path, leaf table) for every module that may hold weights."""
    attn = CONV1X1 if ldm else LINEAR

    def resnet(torch_name, flax_path):
        for sub in ("norm1", "conv1", "norm2", "conv2"):
            yield f"{torch_name}.{sub}", f"{flax_path}/{sub}", NORM if sub.startswith("norm") else CONV
        yield f"{torch_name}.{'nin_shortcut' if ldm else 'conv_shortcut'}", f"{flax_path}/conv_shortcut", CONV

    def mid(part):
        t = f"{part}.mid" if ldm else f"{part}.mid_block"
        yield from resnet(f"{t}.block_1" if ldm else f"{t}.resnets.0", f"{part}/mid/resnet_0")
        a = f"{t}.attn_1" if ldm else f"{t}.attentions.0"
        names = ("norm", "q", "k", "v", "proj_out") if ldm else ("group_norm", "to_q", "to_k", "to_v", "to_out.0")
        for name, flax_name in zip(names, ("group_norm", "to_q", "to_k", "to_v", "to_out")):
            yield f"{a}.{name}", f"{part}/mid/attention/{flax_name}", NORM if flax_name == "group_norm" else attn
        yield from resnet(f"{t}.block_2" if ldm else f"{t}.resnets.1", f"{part}/mid/resnet_1")

    yield "encoder.conv_in", "encoder/conv_in", CONV
    for i in range(len(config.block_out_channels)):
        for j in range(config.layers_per_block):
            t = f"encoder.down.{i}.block.{j}" if ldm else f"encoder.down_blocks.{i}.resnets.{j}"
            yield from resnet(t, f"encoder/down_{i}_resnet_{j}")
        t = f"encoder.down.{i}.downsample.conv" if ldm else f"encoder.down_blocks.{i}.downsamplers.0.conv"
        yield t, f"encoder/down_{i}_downsample", CONV
    yield from mid("encoder")
    yield "encoder.norm_out" if ldm else "encoder.conv_norm_out", "encoder/norm_out", NORM
    yield "encoder.conv_out", "encoder/conv_out", CONV
    yield "quant_conv", "encoder/quant_conv", CONV

    yield "post_quant_conv", "decoder/post_quant_conv", CONV
    yield "decoder.conv_in", "decoder/conv_in", CONV
    yield from mid("decoder")
    n = len(config.decoder_widths)
    for i in range(n):
        for j in range(config.layers_per_block + 1):
            t = f"decoder.up.{n - 1 - i}.block.{j}" if ldm else f"decoder.up_blocks.{i}.resnets.{j}"
            yield from resnet(t, f"decoder/up_{i}_resnet_{j}")
        t = f"decoder.up.{n - 1 - i}.upsample.conv" if ldm else f"decoder.up_blocks.{i}.upsamplers.0.conv"
        yield t, f"decoder/up_{i}_upsample", CONV
    yield "decoder.norm_out" if ldm else "decoder.conv_norm_out", "decoder/norm_out", NORM
    yield "decoder.conv_out", "decoder/conv_out", CONV
    yield "bn", "latent_norm", BN


@functools.lru_cache(maxsize=None)
def expected_shapes(config: KLConfig) -> dict:
    tree = param_shapes(config)
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def rules(config: KLConfig, ldm: bool = False, parts=("encoder", "decoder", "latent_norm")) -> list[Rule]:
    """The rules for the parameters this configuration has (diffusers names, or LDM names with ldm=True)."""
    shapes = expected_shapes(config)
    return [Rule(f"{torch_name}.{suffix}", f"{flax_path}/{leaf}", layout)
            for torch_name, flax_path, table in _modules(config, ldm)
            for suffix, (leaf, layout) in table.items()
            if f"{flax_path}/{leaf}" in shapes and flax_path.split("/")[0] in parts]


def _to_flax(tensors, config, ldm, where, parts=("encoder", "decoder", "latent_norm")):
    tensors = {k: v for k, v in tensors.items() if k != BN_COUNTER}
    shapes = {k: v for k, v in expected_shapes(config).items() if k.split("/")[0] in parts}
    return to_flax(tensors, rules(config, ldm, parts), shapes, where)


# ---- diffusers folders

def config_from_diffusers(cfg: dict, where: str) -> KLConfig:
    cls = cfg.get("_class_name")
    n = len(cfg.get("block_out_channels", (64,)))
    supported = (cfg.get("in_channels", 3) == 3 and cfg.get("out_channels", 3) == 3
                 and cfg.get("act_fn", "silu") == "silu"
                 and list(cfg.get("down_block_types", ["DownEncoderBlock2D"])) == ["DownEncoderBlock2D"] * n
                 and list(cfg.get("up_block_types", ["UpDecoderBlock2D"])) == ["UpDecoderBlock2D"] * n
                 and list(cfg.get("patch_size", (2, 2))) == [2, 2])
    if cls not in DIFFUSERS_CLASSES or not supported:
        raise CheckpointError(f"{where}: unsupported {cls} configuration (need 3 RGB channels, silu, "
                              f"DownEncoderBlock2D/UpDecoderBlock2D blocks, 2x2 patches): {cfg}")
    flux2 = cls == "AutoencoderKLFlux2"
    try:
        return KLConfig(
            latent_channels=cfg.get("latent_channels", 32 if flux2 else 4),
            block_out_channels=tuple(cfg.get("block_out_channels", (128, 256, 512, 512) if flux2 else (64,))),
            decoder_block_out_channels=cfg.get("decoder_block_out_channels"),
            layers_per_block=cfg.get("layers_per_block", 2 if flux2 else 1),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
            mid_block_attention=cfg.get("mid_block_add_attention", True),
            scaling_factor=float(cfg.get("scaling_factor", 1.0 if flux2 else 0.18215)),
            shift_factor=float(cfg.get("shift_factor") or 0.0),
            latents_mean=cfg.get("latents_mean"), latents_std=cfg.get("latents_std"),
            latent_batch_norm=flux2, batch_norm_eps=float(cfg.get("batch_norm_eps", 1e-4)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad {cls} configuration: {e}") from None


def diffusers_config(config: KLConfig) -> dict:
    n = len(config.block_out_channels)
    cfg = {
        "_class_name": "AutoencoderKLFlux2" if config.latent_batch_norm else "AutoencoderKL",
        "in_channels": 3, "out_channels": 3, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
        "latent_channels": config.latent_channels, "norm_num_groups": config.norm_num_groups,
        "use_quant_conv": config.use_quant_conv, "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_attention,
    }
    if config.latent_batch_norm:
        cfg.update(batch_norm_eps=config.batch_norm_eps, patch_size=[2, 2],
                   decoder_block_out_channels=config.decoder_block_out_channels and
                   list(config.decoder_block_out_channels))
    else:
        if config.decoder_block_out_channels not in (None, config.block_out_channels):
            raise CheckpointError("diffusers' AutoencoderKL cannot express separate decoder widths")
        cfg.update(scaling_factor=config.scaling_factor, shift_factor=config.shift_factor or None,
                   latents_mean=config.latents_mean and list(config.latents_mean),
                   latents_std=config.latents_std and list(config.latents_std))
    return cfg


def load_diffusers(cfg: dict, tensors: dict, where: str, hint: str = ""):
    config = config_from_diffusers(cfg, where)
    return config, _to_flax(tensors, config, False, where), variant_name(config, hint)


def diffusers_export(config: KLConfig, params) -> tuple[dict, dict]:
    """(config.json dict, state dict) of a diffusers folder."""
    tensors = from_flax(params, rules(config, parts=tuple(params)))
    if config.latent_batch_norm:
        tensors[BN_COUNTER] = np.zeros((), np.int64)
    return diffusers_config(config), tensors


# ---- LDM single files

def _vae_prefix(tensors):
    """The prefix of an LDM-layout VAE's keys ("" for a bare VAE file), or None."""
    for prefix in LDM_PREFIXES + ("",):
        if any(k.startswith((prefix + "encoder.conv_in.", prefix + "decoder.conv_in.")) for k in tensors):
            return prefix
    return None


def load_file(tensors: dict, path: Path):
    """An LDM single file (a bare VAE, or a full model checkpoint holding one), else None."""
    return None if _vae_prefix(tensors) is None else from_ldm(tensors, str(path), path.name)


def select_vae(tensors):
    """The VAE's tensors of a single file, prefix removed (full model checkpoints hold much else)."""
    prefix = _vae_prefix(tensors) or ""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, prefix


def config_from_ldm(tensors, where) -> KLConfig:
    """The architecture of an LDM-layout state dict, from its shapes alone."""
    def widths(pattern):
        found = {}
        for k, v in tensors.items():
            m = re.fullmatch(pattern, k)
            if m:
                found[int(m.group(1))] = v.shape[0]
        complete = found and sorted(found) == list(range(len(found)))
        return tuple(found[i] for i in range(len(found))) if complete else None

    enc = widths(r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    dec = widths(r"decoder\.up\.(\d+)\.block\.0\.conv1\.weight")
    has = _parts(tensors)
    if not has:
        raise CheckpointError(f"{where}: no encoder.conv_in or decoder.conv_in: not an LDM VAE")
    # a file may hold one side only (e.g. an extracted decoder): the architecture is read from that side
    if "encoder" in has:
        latent = tensors.get("encoder.conv_out.weight", np.empty((0,))).shape[0] // 2
        blocks = _count(tensors, r"encoder\.down\.0\.block\.(\d+)\..+")
    else:
        latent = tensors["decoder.conv_in.weight"].shape[1]
        blocks = _count(tensors, r"decoder\.up\.0\.block\.(\d+)\..+") - 1  # the decoder has one more
    stages = enc if "encoder" in has else dec
    if stages is None or blocks < 1 or latent < 1:
        raise CheckpointError(f"{where}: cannot read the {has[0]}'s stages and latent channels from its keys")
    quant, post_quant = "quant_conv.weight" in tensors, "post_quant_conv.weight" in tensors
    try:
        return KLConfig(latent_channels=latent, block_out_channels=stages,
                        decoder_block_out_channels=None if dec in (None, stages) else dec,
                        layers_per_block=blocks,  # a missing side is taken to mirror the present one
                        use_quant_conv=quant if "encoder" in has else post_quant,
                        use_post_quant_conv=post_quant if "decoder" in has else quant,
                        mid_block_attention=f"{has[0]}.mid.attn_1.q.weight" in tensors,
                        latent_batch_norm="bn.running_mean" in tensors)
    except ValueError as e:
        raise CheckpointError(f"{where}: unsupported LDM VAE: {e}") from None


def _parts(tensors) -> tuple:
    """The sides an LDM state dict holds: ("encoder", "decoder"), or one of them."""
    return tuple(p for p in ("encoder", "decoder") if f"{p}.conv_in.weight" in tensors)


def _count(tensors, pattern) -> int:
    return len({m.group(1) for k in tensors if (m := re.fullmatch(pattern, k))})


def _architecture(config: KLConfig) -> KLConfig:
    return dataclasses.replace(config, scaling_factor=1.0, shift_factor=0.0, latents_mean=None, latents_std=None)


def from_ldm(tensors, where: str, hint: str = ""):
    """An LDM single file -> (config with the matching preset's latent conventions, params, name).

    Weights do not say which model a VAE belongs to: equal architectures (sd15/sd2/sdxl, sd3/flux1) are told
    apart by a preset name in the file name, else by the file's kind (a bare 16-channel file is FLUX's
    ae.safetensors, a prefixed one an SD3 checkpoint), else the first preset.
    """
    tensors, prefix = select_vae(tensors)
    arch = config_from_ldm(tensors, where)
    same = lambda a, b: _architecture(a) == _architecture(b)
    candidates, named = matching_presets(PRESETS, arch, "", same), matching_presets(PRESETS, arch, hint, same)
    if named == candidates and "flux1" in candidates and not prefix:  # no name in the hint: a bare file is FLUX's
        named = ["flux1"]
    name = (named or ["custom"])[0]
    config = PRESETS[name] if named else arch
    return config, _to_flax(tensors, config, True, where, _parts(tensors) + ("latent_norm",)), name


def variant_name(config: KLConfig, hint: str = "") -> str:
    return (matching_presets(PRESETS, config, hint) or ["custom"])[0]
