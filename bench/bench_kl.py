"""AutoencoderKL speed and memory: flax-vae vs diffusers' PyTorch AutoencoderKL vs diffusers 0.39's FlaxAutoencoderKL.

Implementations: "ours" (flax-vae's pure functions), "shim" (flax_vae.FlaxAutoencoderKL, called as diffusers 0.39's
class was: NCHW, its params tree), "torch" (diffusers' PyTorch AutoencoderKL) and "old_flax" (diffusers 0.39).
One SD 1.5 configuration with the same random weights (a diffusers folder written once) is loaded by all three.
Every configuration runs in its own subprocess, so its peak memory is its own (CPU: peak RSS from getrusage;
GPU: the framework's peak device allocation). JAX compile time (lower + compile) is reported apart from the
steady state (median of --reps timed calls after one warm-up call).

    python bench/bench_kl.py --old-python /tmp/venv-d039/bin/python            # CPU, float32, batch 1 and 4
    python bench/bench_kl.py --old-python ... --dtypes float32 bfloat16 --device gpu

diffusers 0.39 (the last release with FlaxAutoencoderKL) goes in a separate virtual environment, e.g.
    python -m venv /tmp/venv-d039 && /tmp/venv-d039/bin/pip install "diffusers==0.39.*" jax==0.10.2 flax==0.12.8
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLS = ("ours", "shim", "torch", "old_flax")


# ---- workers (run in a subprocess; old_flax in the diffusers 0.39 environment)

def _peak_memory_mb(impl, device, compiled=None):
    if device == "gpu" and impl == "torch":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    if device == "gpu":  # the allocator's peak also counts cuDNN autotuning scratch: use XLA's buffer plan
        m = compiled.memory_analysis()
        return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _old_flax_params(tensors):
    """diffusers PyTorch names -> FlaxAutoencoderKL (0.39) parameter tree."""
    params = {}
    for key, value in tensors.items():
        key = re.sub(r"\.(\d+)", r"_\1", key)
        for torch_name, flax_name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                                      ("to_out_0", "proj_attn")):
            key = key.replace(f".{torch_name}.", f".{flax_name}.")
        *path, leaf = key.split(".")
        if leaf == "weight":
            leaf = {4: "kernel", 2: "kernel", 1: "scale"}[value.ndim]
            value = {4: lambda a: a.transpose(2, 3, 1, 0), 2: lambda a: a.T, 1: lambda a: a}[value.ndim](value)
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return params


def worker(impl, op, batch, dtype, folder, reps, device, size):
    import numpy as np
    rng = np.random.default_rng(0)
    lat = size // 8
    x = (rng.uniform(-1, 1, (batch, size, size, 3)) if op == "encode" else
         rng.normal(size=(batch, lat, lat, 4))).astype(np.float32)
    if impl == "torch":
        import torch
        from diffusers import AutoencoderKL
        dev = "cuda" if device == "gpu" else "cpu"
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        model = AutoencoderKL.from_pretrained(folder).to(dev, tdt).eval()
        inp = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev, tdt)

        def run():
            with torch.no_grad():
                out = model.encode(inp).latent_dist.mean if op == "encode" else model.decode(inp).sample
            if dev == "cuda":
                torch.cuda.synchronize()
            return out
    else:
        import jax
        import jax.numpy as jnp
        jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        if impl in ("ours", "ours_unbanded"):
            import flax_vae
            from flax_vae.autoencoder import decode_fn, encode_fn
            vae = flax_vae.load(folder, dtype=jdt, param_dtype=jnp.float32)
            module, params, inp = vae.module, vae.params, jnp.asarray(x)
            if impl == "ours_unbanded":  # the decoder without row bands (AutoencoderKL.band_above)
                module = module.clone(band_above=None)
            fn = jax.jit(encode_fn if op == "encode" else decode_fn, static_argnums=0)
            lowered = lambda: fn.lower(module, params, inp)
        else:  # the same calls for diffusers 0.39's class and for flax-vae's drop-in
            if impl == "shim":
                from flax_vae import FlaxAutoencoderKL
                model, params = FlaxAutoencoderKL.from_pretrained(folder, dtype=jdt)
            else:
                from diffusers import FlaxAutoencoderKL
                from safetensors.numpy import load_file
                config = json.loads((Path(folder) / "config.json").read_text())
                config = {k: v for k, v in config.items() if not k.startswith("_") and k in (
                    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
                    "scaling_factor")}
                model = FlaxAutoencoderKL(**config, dtype=jdt)
                params = jax.device_put(_old_flax_params(load_file(str(Path(folder) /
                                                                       "diffusion_pytorch_model.safetensors"))))
            inp = jnp.asarray(x.transpose(0, 3, 1, 2))  # the old port takes NCHW
            if op == "encode":
                fn = jax.jit(lambda p, s: model.apply({"params": p}, s, method=model.encode).latent_dist.mean)
            else:
                fn = jax.jit(lambda p, s: model.apply({"params": p}, s, method=model.decode).sample)
            lowered = lambda: fn.lower(params, inp)
        t = time.perf_counter()
        compiled = lowered().compile()
        compile_s = time.perf_counter() - t
        args = (params, inp)

        def run():
            return jax.block_until_ready(compiled(*args))

    setup_mb = _peak_memory_mb(impl, device, None if impl == "torch" else compiled)  # model loaded (and compiled)
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    median = statistics.median(times) if times else None
    print(json.dumps({"first_s": first, "median_s": median, "times": times,
                      "compile_s": None if impl == "torch" else compile_s, "setup_mb": setup_mb,
                      "peak_mb": _peak_memory_mb(impl, device, None if impl == "torch" else compiled)}))


# ---- driver

def make_weights(folder):
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    model.save_pretrained(folder)  # SD 1.5's VAE configuration, random weights


def measure(impl, op, batch, dtype, folder, args, size=512, reps=None):
    python = args.old_python if impl == "old_flax" else sys.executable
    if python is None:
        return {"error": "no --old-python"}
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    if args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [python, __file__, "--worker", impl, op, str(batch), dtype, str(folder),
           str(args.reps if reps is None else reps), args.device, str(size)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not done after --timeout {args.timeout} s"}
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"rc {proc.returncode}: {tail[:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(v, unit=""):
    return "-" if v is None else f"{v:.4g}{unit}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-python", help="python of a venv with diffusers 0.39 (FlaxAutoencoderKL)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default=None, help="default: gpu if JAX sees one")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16"))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=("decode", "encode"))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions after the first (compile) call")
    parser.add_argument("--no-1024", action="store_true", help="skip the 1024x1024 decode memory rows")
    parser.add_argument("--only-1024", action="store_true", help="run only the 1024x1024 decode memory rows")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration (process)")
    args = parser.parse_args()
    if args.device is None:
        import jax
        args.device = "gpu" if jax.default_backend() == "gpu" else "cpu"

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15-vae"
        make_weights(folder)
        print(f"device={args.device} reps={args.reps} (times in s; peak memory in MiB: "
              f"{'peak RSS' if args.device == 'cpu' else 'peak device allocation'})\n")
        if not args.only_1024:
            print("| op | batch | dtype | impl | compile s | median s | vs ours | vs old Flax | vs PyTorch | peak MiB |")
            print("|---|---|---|---|---|---|---|---|---|---|")
        for op in [] if args.only_1024 else args.ops:
            for batch in args.batches:
                for dtype in args.dtypes:
                    rows = {impl: measure(impl, op, batch, dtype, folder, args) for impl in args.impls}
                    for impl, r in rows.items():
                        if "error" in r:
                            print(f"| {op} | {batch} | {dtype} | {impl} | {r['error']} | | | | | |")
                            continue
                        ratio = lambda other: (r["median_s"] / rows[other]["median_s"]
                                               if rows.get(other, {}).get("median_s") else None)
                        print(f"| {op} | {batch} | {dtype} | {impl} | {fmt(r['compile_s'])} | {fmt(r['median_s'])} | "
                              f"{fmt(ratio('ours'), 'x')} | {fmt(ratio('old_flax'), 'x')} | {fmt(ratio('torch'), 'x')} | "
                              f"{r['peak_mb']:.0f} |",
                              flush=True)
        if not args.no_1024:
            print("\n1024x1024 decode (batch 1, float32), one call each (ours_unbanded: band_above=None):\n")
            print("| impl | first call s | peak MiB before the call | peak MiB |")
            print("|---|---|---|---|")
            for impl in ("ours", "ours_unbanded", "old_flax"):
                r = measure(impl, "decode", 1, "float32", folder, args, size=1024, reps=0)
                print(f"| {impl} | " + (r["error"] if "error" in r else
                                        f"{r['first_s']:.1f} | {r['setup_mb']:.0f} | {r['peak_mb']:.0f}") + " |",
                      flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        impl, op, batch, dtype, folder, reps, device, size = sys.argv[2:10]
        worker(impl, op, int(batch), dtype, folder, int(reps), device, int(size))
    else:
        main()
