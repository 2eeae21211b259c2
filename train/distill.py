"""Distil a tiny TAESD-style autoencoder from any teacher flax-vae loads (the recipe: docs/distillation.md).

    python -m flax_vae.train.distill --teacher taef2 --student taesd-half --data photos/ --out runs/taef2-half

Decoder: the student decodes the teacher's latents of random crops (in the diffusion model's latent space) into
what the teacher's decoder makes of them: L1 + MSE, optionally an image-gradient term and a latent-conditioned
patch adversarial loss. Encoder: the student maps the crops to the teacher's latents (MSE).
Teacher outputs are computed for a pool of `pool_size` crops that serves `pool_reuse` steps; the crops of pool k
and the batch of step s are pure functions of (seed, k) and (seed, s), so `--resume` continues exactly.
"""
import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter
from tqdm import tqdm

import flax_vae
from flax_vae import convert, parallel
from flax_vae.images import check_writable, printable, psnr, save_grid, writing

from . import data, students


@dataclasses.dataclass(frozen=True)
class Config:
    teacher: str  # bundled name, checkpoint path or Hub id (org/name[@revision][:subfolder]): what flax_vae.load takes
    data: str  # folder of training images
    out: str  # run folder: checkpoints, TensorBoard logs, grids, export
    student: str = "taesd"  # preset (train.students.PRESETS) or a JSON file of TAESDConfig fields
    eval_data: str = ""  # held-out images (default: the last eighth of --data, kept out of training)
    parts: str = "encoder,decoder"
    latents: str = "diffusion"  # the student's latent space: the teacher's "diffusion" (scaled) or "raw" latents
    init: str = "auto"  # "teacher" (its weights cut to the student's width), "random", "auto": teacher if possible
    steps: int = 2000
    batch_size: int = 8
    crop: str = "128"  # a crop size, or a schedule "64,96@300,128@600" (size@first step)
    optimizer: str = "adamw"  # or "muon": orthogonalised momentum for the conv kernels, AdamW for the rest
    lr: float = 1e-3
    warmup: int = 50  # linear warm-up steps (at most half the steps), then cosine decay to lr / 100
    weight_decay: float = 0.0
    clip: float = 1.0  # global gradient norm
    ema: float = 0.999
    l1: float = 1.0
    mse: float = 1.0
    gradient_loss: float = 0.0  # L1 between the image gradients (finite differences)
    loss_pool: int = 1  # compare decoder outputs average-pooled by this factor
    adversarial: float = 0.0  # weight of the latent-conditioned patch discriminator's hinge loss
    pool_size: int = 64
    pool_reuse: int = 8
    eval_size: int = 256
    seed: int = 0
    eval_every: int = 100
    grid_every: int = 500
    checkpoint_every: int = 100
    keep: int = 2  # checkpoints kept
    until: int = 0  # stop after this step (0: at --steps) with a checkpoint; continue later with --resume


# Fields that only change what is logged or when: a resumed run may change these.
NOT_TRAJECTORY = {"out", "eval_every", "grid_every", "checkpoint_every", "keep", "until"}


class PatchDiscriminator(nn.Module):
    """Real/fake logits per 8x8 patch of an image, given the latents it was decoded from."""

    @nn.compact
    def __call__(self, images, latents):
        x = images
        for features in (32, 64, 64):
            x = nn.leaky_relu(nn.Conv(features, (4, 4), strides=2, padding=1)(x), 0.2)  # 1/8 in three steps
        repeat = x.shape[1] // latents.shape[1]
        z = jnp.repeat(jnp.repeat(latents, repeat, axis=1), repeat, axis=2)
        x = nn.leaky_relu(nn.Conv(64, (3, 3), padding=1)(jnp.concatenate([x, z], axis=-1)), 0.2)
        return nn.Conv(1, (3, 3), padding=1)(x)


def crop_schedule(spec: str) -> list[tuple[int, int]]:
    """ "64,96@300,128@600" -> [(0, 64), (300, 96), (600, 128)] (first step, crop size)."""
    try:
        stages = [(int(s.split("@")[1]) if "@" in s else 0, int(s.split("@")[0])) for s in spec.split(",")]
    except (ValueError, IndexError):
        raise ValueError(f"--crop {spec!r}: expected a size or 'SIZE,SIZE@STEP,...'") from None
    firsts = [first for first, _ in stages]
    if firsts[0] != 0 or any(b <= a for a, b in zip(firsts, firsts[1:])):
        raise ValueError(f"--crop {spec!r}: the first size starts at step 0, the others at increasing steps")
    return stages


def crop_at(schedule, step: int) -> int:
    return [size for first, size in schedule if first <= step][-1]


class Distiller:
    """Teacher, student, data and the jitted train step of one run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.parts = tuple(p for p in ("encoder", "decoder") if p in cfg.parts.split(","))
        if not self.parts or set(cfg.parts.split(",")) - {"encoder", "decoder"}:
            raise ValueError(f"--parts {cfg.parts!r}: give encoder, decoder or encoder,decoder")
        if cfg.latents not in ("diffusion", "raw") or cfg.init not in ("auto", "teacher", "random"):
            raise ValueError("--latents takes diffusion or raw; --init takes auto, teacher or random")
        self.schedule = crop_schedule(cfg.crop)
        self.mesh = parallel.default_mesh()
        if cfg.batch_size % self.mesh.devices.size or cfg.pool_size < cfg.batch_size:
            raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {self.mesh.devices.size} "
                             f"devices and at most --pool-size {cfg.pool_size}")

        self.skipped = []  # (path, reason): unreadable images and folders, listed once the run starts
        train_files = data.image_files(cfg.data, self.skipped)
        if cfg.eval_data:
            eval_files = data.image_files(cfg.eval_data, self.skipped)
        elif len(train_files) < 2:
            raise ValueError(f"data folder {cfg.data}: one image; give at least two or a separate --eval-data")
        else:  # hold out the last eighth
            held = max(1, len(train_files) // 8)
            train_files, eval_files = train_files[:-held], train_files[-held:]
        self.train_files, self.eval_files = train_files, eval_files
        # unreadable images are skipped (listed in self.skipped); none readable is an error
        self.crops = data.Crops(train_files, max(size for _, size in self.schedule))
        self.skipped += self.crops.skipped
        self.held_images = data.eval_images(eval_files, cfg.eval_size, self.skipped)

        self.teacher = flax_vae.load(cfg.teacher)
        needed = ("encoder", "decoder") if "decoder" in self.parts else ("encoder",)
        if any(p not in self.teacher.params for p in needed):
            raise ValueError(f"teacher {cfg.teacher}: distilling the {' and '.join(self.parts)} needs the "
                             f"teacher's {' and '.join(needed)}, it has {' and '.join(self.teacher.params)}")
        self.pteacher = flax_vae.data_parallel(self.teacher, self.mesh)
        probe = jax.eval_shape(self._teacher_latents_fn, jnp.zeros((1, 256, 256, 3)))
        channels, factor = probe.shape[-1], 256 // probe.shape[1]
        try:
            self.student_config = students.student_config(cfg.student, channels, factor, self.teacher.config)
        except ValueError as e:
            hint = " (or try --latents raw)" if cfg.latents == "diffusion" else ""
            raise ValueError(f"{e}; the teacher's {cfg.latents} latents have {channels} channels at 1/{factor}"
                             f"{hint}") from None
        if min(size for _, size in self.schedule) % factor or cfg.eval_size % factor:
            raise ValueError(f"--crop and --eval-size must be multiples of the factor {factor}")
        self.student = flax_vae.TAESD(self.student_config)
        self.disc = PatchDiscriminator()
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup, cfg.steps // 2), cfg.steps,
                                                cfg.lr * 0.01)
        if cfg.optimizer == "adamw":
            optimizer = optax.adamw(lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "muon":
            kernels = lambda params: jax.tree.map(lambda p: optax.contrib.MuonDimensionNumbers((0, 1, 2), 3)
                                                  if p.ndim == 4 else None, params)
            optimizer = optax.contrib.muon(lr, weight_decay=cfg.weight_decay, adam_weight_decay=cfg.weight_decay,
                                           muon_weight_dimension_numbers=kernels, consistent_rms=0.2)
        else:
            raise ValueError(f"--optimizer {cfg.optimizer!r}: adamw or muon")
        self.optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip), optimizer)
        self.disc_optimizer = optax.adam(cfg.lr * 0.5, b1=0.5)
        same, rows = parallel.replicated_sharding(self.mesh), parallel.batch_sharding(self.mesh)
        self.train_step = jax.jit(self._train_step, in_shardings=(same, rows), out_shardings=(same, same),
                                  donate_argnums=0)
        self.student_apply = jax.jit(self._student_apply)

    def _teacher_latents_fn(self, images):
        z = flax_vae.encode_fn(self.teacher.module, self.teacher.params, images)
        return z if self.cfg.latents == "raw" else flax_vae.scale_latents_fn(self.teacher.module,
                                                                             self.teacher.params, z)

    def teacher_targets(self, images) -> dict:
        """Crops -> {"x": crops, "z": teacher latents (student space), "y": teacher decoder output}."""
        raw = self.pteacher.encode(images)
        z = raw if self.cfg.latents == "raw" else self.teacher.scale_latents(raw)
        out = {"x": np.asarray(images), "z": np.asarray(z)}
        if "decoder" in self.parts:
            out["y"] = np.asarray(self.pteacher.decode(raw))
        return out

    def pool(self, k: int) -> dict:
        crop = crop_at(self.schedule, k * self.cfg.pool_reuse)
        return self.teacher_targets(self.crops.sample(np.random.default_rng([self.cfg.seed, 0, k]),
                                                      self.cfg.pool_size, crop))

    def batch(self, pool: dict, step: int):
        """Step `step`'s rows of the pool, this process's share, sharded over the mesh."""
        idx = np.random.default_rng([self.cfg.seed, 1, step]).choice(self.cfg.pool_size, self.cfg.batch_size,
                                                                     replace=False)
        share = self.cfg.batch_size // jax.process_count()
        idx = idx[jax.process_index() * share:(jax.process_index() + 1) * share]
        return {k: parallel.shard_rows(self.mesh, v[idx]) for k, v in pool.items()}

    def init_state(self) -> dict:
        cfg, rng = self.cfg, jax.random.PRNGKey(self.cfg.seed)
        from_teacher = cfg.init == "teacher" or (
            cfg.init == "auto" and students.can_start_from(self.student_config, self.teacher.config))
        if from_teacher and not students.can_start_from(self.student_config, self.teacher.config):
            raise ValueError(f"--init teacher: the student {self.student_config} cannot take the teacher's "
                             f"weights (needs a TAESD teacher of the same layout, at least as wide)")
        if from_teacher and cfg.latents == "raw" and self.teacher.config.scaling_factor != 1:
            raise ValueError("--init teacher needs the teacher's latent space: use --latents diffusion")
        teacher = (self.teacher.config, self.teacher.params) if from_teacher else (None, None)
        params = students.initial_params(self.student_config, self.parts, rng, *teacher)
        params = jax.tree.map(jnp.asarray, params)
        self.init_source = "the teacher's weights (channel subset)" if from_teacher else "random"
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema": jax.tree.map(jnp.copy, params),
                 "opt": self.optimizer.init(params), "clock": jnp.zeros(2)}  # clock: wall and CPU seconds
        if cfg.adversarial:
            crop, c = crop_at(self.schedule, 0), self.student_config.latent_channels
            f = self.student_config.factor
            disc = self.disc.init(jax.random.fold_in(rng, 1), jnp.zeros((1, crop, crop, 3)),
                                  jnp.zeros((1, crop // f, crop // f, c)))["params"]
            state.update(disc=disc, disc_opt=self.disc_optimizer.init(disc))
        return parallel.replicate(self.mesh, state)

    def _losses(self, params, state, batch):
        cfg, metrics, total = self.cfg, {}, 0.0
        if "decoder" in params:
            y = flax_vae.decode_fn(self.student, params, batch["z"])
            a, b = y, batch["y"]
            if cfg.loss_pool > 1:
                pool = lambda t: nn.avg_pool(t, (cfg.loss_pool,) * 2, (cfg.loss_pool,) * 2)
                a, b = pool(a), pool(b)
            metrics["l1"], metrics["mse"] = jnp.mean(jnp.abs(a - b)), jnp.mean((a - b) ** 2)
            total += cfg.l1 * metrics["l1"] + cfg.mse * metrics["mse"]
            if cfg.gradient_loss:
                grads = lambda t: (t[:, 1:] - t[:, :-1], t[:, :, 1:] - t[:, :, :-1])
                metrics["gradient"] = sum(jnp.mean(jnp.abs(g - h)) for g, h in zip(grads(y), grads(batch["y"])))
                total += cfg.gradient_loss * metrics["gradient"]
            if cfg.adversarial:
                metrics["adversarial"] = -jnp.mean(self.disc.apply({"params": state["disc"]}, y, batch["z"]))
                total += cfg.adversarial * metrics["adversarial"]
            metrics["decoded"] = y
        if "encoder" in params:
            z = flax_vae.encode_fn(self.student, params, batch["x"])
            metrics["latent_mse"] = jnp.mean((z - batch["z"]) ** 2)
            total += metrics["latent_mse"]
        return total, metrics

    def _train_step(self, state, batch):
        (loss, metrics), grads = jax.value_and_grad(self._losses, has_aux=True)(state["params"], state, batch)
        updates, opt = self.optimizer.update(grads, state["opt"], state["params"])
        metrics["update_norm"] = optax.global_norm(updates)
        params = optax.apply_updates(state["params"], updates)
        decay = jnp.minimum(self.cfg.ema, (1.0 + state["step"]) / (10.0 + state["step"]))
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
        state = dict(state, step=state["step"] + 1, params=params, ema=ema, opt=opt)
        decoded = metrics.pop("decoded", None)
        if self.cfg.adversarial:
            def disc_loss(d):
                real = self.disc.apply({"params": d}, batch["y"], batch["z"])
                fake = self.disc.apply({"params": d}, jax.lax.stop_gradient(decoded), batch["z"])
                return jnp.mean(nn.relu(1 - real)) + jnp.mean(nn.relu(1 + fake))
            metrics["discriminator"], g = jax.value_and_grad(disc_loss)(state["disc"])
            updates, disc_opt = self.disc_optimizer.update(g, state["disc_opt"], state["disc"])
            state.update(disc=optax.apply_updates(state["disc"], updates), disc_opt=disc_opt)
        return state, dict(metrics, loss=loss)

    def _student_apply(self, params, latents, images):
        out = {}
        if "decoder" in params:
            out["decoded"] = flax_vae.decode_fn(self.student, params, latents)
        if "encoder" in params:
            out["latents"] = flax_vae.encode_fn(self.student, params, images)
        return out

    def evaluate(self, state, held: dict) -> dict:
        """PSNR of the student's decoder against the teacher's on the held-out images (and the EMA weights'),
        and the student encoder's latent MSE."""
        results = {}
        for name in ("params", "ema"):
            out = self.student_apply(state[name], held["z"], held["x"])
            suffix = "_ema" if name == "ema" else ""
            if "decoded" in out:
                results[f"psnr{suffix}"] = float(np.mean([psnr(a, b) for a, b in zip(
                    np.asarray(out["decoded"]), held["y"])]))
            if "latents" in out:
                results[f"latent_mse{suffix}"] = float(np.mean((np.asarray(out["latents"]) - held["z"]) ** 2))
        return results

    def grid(self, state, held: dict, path: Path):
        """Rows of held-out input | teacher | student (EMA weights; for an encoder alone: the teacher decoding
        the student's latents)."""
        out = self.student_apply(state["ema"], held["z"], held["x"])
        if "decoded" in out:
            student = np.asarray(out["decoded"])
        else:
            z = out["latents"] if self.cfg.latents == "raw" else self.teacher.unscale_latents(out["latents"])
            student = np.asarray(self.teacher.decode(z))
        teacher = held["y"] if "y" in held else np.asarray(self.teacher.decode(
            self.teacher.encode(held["x"])))
        save_grid(path, [[x, t, s] for x, t, s in zip(held["x"], teacher, student)])

    def export(self, state, folder: Path) -> dict:
        """The EMA weights as flax-vae, madebyollin and (where diffusers can express it) diffusers folders."""
        name = re.sub(r"[^\w.-]+", "-", f"{Path(self.teacher.name).name}-{Path(self.cfg.student).stem}")
        params = jax.tree.map(np.asarray, state["ema"])
        vae = flax_vae.Autoencoder(self.student_config, self.student, params, name)
        written = {}
        for to in ("flax", "madebyollin", "diffusers"):
            try:
                flax_vae.save(vae, folder / to, to=to, overwrite=True)  # the run's own folder
                written[to] = folder / to
            except convert.CheckpointError as e:
                written[to] = f"not written: {e}"
        return written


def skipped_line(skipped, shown=5) -> str:
    """[(path, reason), ...] -> "skipped 2 unreadable images: a.png (reason), b.png (reason)" (the first few)."""
    names = [f"{printable(Path(path).name)} ({reason})" for path, reason in skipped[:shown]]
    more = f", and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}: {', '.join(names)}{more}"


def check_run(cfg: Config, resume: bool) -> Path:
    """A new run needs an empty or missing folder in a writable place; a resumed one the same settings. Nothing is
    written here."""
    run, saved = Path(cfg.out), Path(cfg.out) / "config.json"
    check_writable(run, "--out")
    if resume:
        if not saved.is_file():
            raise ValueError(f"--resume: {run} holds no run (no config.json)")
        old = json.loads(saved.read_text())
        changed = {k: (old.get(k), v) for k, v in _settings(cfg).items() if old.get(k) != v}
        if changed:
            raise ValueError(f"--resume: {run} was trained with other settings: " + ", ".join(
                f"{k} {a!r} (now {b!r})" for k, (a, b) in changed.items()))
    elif run.exists() and (not run.is_dir() or any(not p.name.endswith(".partial") for p in run.iterdir())):
        # .partial: a killed run's unfinished first write of config.json; the new run writes it again
        raise ValueError(f"{run} already exists and is not an empty folder: pass --resume to continue that run, "
                         f"or choose another --out")
    return run


def _settings(cfg: Config) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_TRAJECTORY}


def distill(cfg: Config, resume: bool = False) -> dict:
    """Run (or continue) a distillation; returns the last evaluation and the export folders."""
    run = check_run(cfg, resume)
    d = Distiller(cfg)  # checks teacher, student and data before anything is written
    if not resume:
        with writing(run / "config.json"):
            convert.checkpoint.write_atomic(run / "config.json", json.dumps(_settings(cfg), indent=1).encode())
    state = d.init_state()
    manager = ocp.CheckpointManager(run.resolve() / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, save_interval_steps=cfg.checkpoint_every, enable_async_checkpointing=False,
        cleanup_tmp_directories=True))  # a killed run's unfinished checkpoint: never restored, removed here
    if resume and manager.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    start, stop = int(state["step"]), min(cfg.until or cfg.steps, cfg.steps)
    unreadable = {path for path, _ in d.skipped}
    if d.skipped:
        print(skipped_line(d.skipped), flush=True)
    held_out = ", ".join(printable(p.name) for p in d.eval_files if p not in unreadable)
    print(f"teacher {d.teacher} ({cfg.latents} latents) -> student {d.student_config}, parts {d.parts}, "
          f"init {d.init_source}; {len(d.train_files) - len(d.crops.skipped)} training images, held out: "
          f"{held_out}; {d.mesh.devices.size} device(s); from step {start}")

    held = d.teacher_targets(d.held_images)
    writer = SummaryWriter(str(run / "tensorboard"))
    clock0, (wall0, cpu0) = (time.perf_counter(), time.process_time()), np.asarray(state["clock"]).tolist()
    clock = lambda: (wall0 + time.perf_counter() - clock0[0], cpu0 + time.process_time() - clock0[1])

    def log_eval(step):
        results = d.evaluate(state, held)
        wall, cpu = clock()
        for k, v in results.items():
            writer.add_scalar(f"eval/{k}", v, step)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(step=step, wall_s=round(wall, 1), cpu_s=round(cpu, 1), **results)) + "\n")
        return results

    results = log_eval(start) if start == 0 else {}
    pool, pool_index = None, -1
    bar = tqdm(range(start, stop), initial=start, total=stop, desc="distill", dynamic_ncols=True)
    for step in bar:
        if step // cfg.pool_reuse != pool_index:
            pool_index = step // cfg.pool_reuse
            pool = d.pool(pool_index)
        state, metrics = d.train_step(state, d.batch(pool, step))
        metrics = {k: float(v) for k, v in metrics.items()}
        done = step + 1
        if not np.isfinite(metrics["loss"] + metrics["update_norm"]):  # stop before a diverged state is saved
            raise FloatingPointError(f"step {done}: loss {metrics['loss']}, update norm {metrics['update_norm']} "
                                     f"(diverged: lower --lr); the checkpoints so far are kept (latest: step "
                                     f"{manager.latest_step()})")
        for k, v in metrics.items():
            writer.add_scalar(f"train/{k}", v, done)
        if done % cfg.eval_every == 0 or done == stop:
            results = log_eval(done)
        if done % cfg.grid_every == 0 or done == stop:
            d.grid(state, held, run / "grids" / f"step_{done:06d}.png")
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", **{k: f"{v:.2f}" for k, v in results.items()
                                                          if k.startswith("psnr")})
        if done % cfg.checkpoint_every == 0 or done == stop:
            state["clock"] = parallel.replicate(d.mesh, jnp.asarray(clock()))
            manager.save(done, args=ocp.args.StandardSave(state), force=done == stop)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    out = dict(results, step=int(state["step"]))
    if int(state["step"]) == cfg.steps:
        out["export"] = d.export(state, run / "export")
        for to, where in out["export"].items():
            print(f"export {to}: {where}")
    return out


# --help for the settings whose name does not say it all (the comments of Config, in the command line's words)
HELP = {
    "teacher": "the model to distil: a bundled name, a checkpoint or a Hugging Face Hub id (org/name, "
               "org/name@REVISION, org/name:SUBFOLDER): anything flax-vae reconstruct --model takes",
    "data": "folder of training images (searched recursively; unreadable ones are skipped and listed)",
    "out": "run folder: checkpoints, TensorBoard logs, grids, export (a new or empty folder, or --resume)",
    "student": "a preset (" + ", ".join(students.PRESETS) + "), or a JSON file of TAESDConfig fields",
    "eval_data": "folder of held-out images (default: the last eighth of --data, kept out of training)",
    "parts": "what to distil: encoder, decoder or encoder,decoder",
    "latents": "the student's latent space: the teacher's diffusion (scaled) latents or its raw ones",
    "init": "start from the teacher's weights cut to the student's width, from random ones, or auto: the "
            "teacher's where possible",
    "crop": "training crop size, or a schedule SIZE,SIZE@STEP,... (e.g. 64,96@300,128@600)",
    "optimizer": "adamw, or muon (orthogonalised momentum for the conv kernels, AdamW for the rest)",
    "warmup": "linear warm-up steps (at most half the steps), then cosine decay to lr / 100",
    "clip": "clip the global gradient norm to this",
    "ema": "decay of the exponential moving average of the weights (evaluated, exported)",
    "gradient_loss": "weight of the L1 loss between image gradients (finite differences)",
    "loss_pool": "compare decoder outputs average-pooled by this factor",
    "adversarial": "weight of the latent-conditioned patch discriminator's hinge loss",
    "pool_size": "crops whose teacher outputs are computed together",
    "pool_reuse": "training steps served by one pool",
    "eval_size": "side of the held-out images' centre squares",
    "keep": "checkpoints kept",
    "until": "stop after this step with a checkpoint (0: at --steps); continue later with --resume",
}
CHOICES = {"optimizer": ("adamw", "muon"), "latents": ("diffusion", "raw"), "init": ("auto", "teacher", "random")}


def add_arguments(parser):
    for f in dataclasses.fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), HELP.get(f.name, "")
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True, type=f.type, help=text)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, choices=CHOICES.get(f.name),
                                help=f"{text} (default: {f.default})".lstrip() if f.default != "" else text)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (as does "
                        "FLAX_VAE_DEBUG=1)")


def config_from_args(args) -> Config:
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


def main(argv=None, prog="python -m flax_vae.train.distill", parser_class=argparse.ArgumentParser, debug=False):
    """Parse the command line and run; an error is one line on stderr (exit status 1), or with --debug (or
    FLAX_VAE_DEBUG=1, or `debug`) its traceback."""
    parser = parser_class(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        distill(config_from_args(args), args.resume)
    except Exception as e:  # KeyboardInterrupt passes: the checkpoints so far are kept
        if debug or args.debug or os.environ.get("FLAX_VAE_DEBUG", "") not in ("", "0"):
            raise
        lines = str(e).strip().splitlines()
        message = " ".join(lines[0].split()) if lines else ""
        if not isinstance(e, (ValueError, OSError)):
            message = f"{type(e).__name__}: {message} (--debug shows the traceback)"
        sys.exit(f"error: {message}")


if __name__ == "__main__":
    main()
