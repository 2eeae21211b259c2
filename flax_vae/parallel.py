"""Data parallelism for every family: the batch sharded over the devices of a mesh, params replicated.

One process or many: after `jax.distributed.initialize()` every process passes its own rows and gets its own
rows back, and all processes must call together (each call is one collective program over the global mesh).
Row counts need not divide the device count, nor be equal across processes: batches are padded and trimmed.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import tiling
from .autoencoder import Autoencoder, as_tiling, decode_fn, decode_uint8_fn, encode_fn, posterior_fn
from .images import to_uint8

AXIS = "data"


def default_mesh() -> Mesh:
    """Every device of every process on one "data" axis."""
    return Mesh(np.array(jax.devices()), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(mesh: Mesh, tree):
    """A copy of every leaf on every device of the mesh (params, optimizer state, keys)."""
    return jax.device_put(tree, replicated_sharding(mesh))


def shard_rows(mesh: Mesh, local_rows):
    """This process's rows (a multiple of its device count in the mesh) -> one global array over the mesh."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local_rows))


def local_rows(global_array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, on the host."""
    shards = {s.index[0].start or 0: s.data for s in global_array.addressable_shards}  # replicas share a start
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def _local_devices(mesh: Mesh) -> list:
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def _padded_rows(mesh: Mesh, n: int) -> int:
    """Rows every process feeds: at least n, a multiple of the local device count, equal in every process."""
    devices = len(_local_devices(mesh))
    per_device = -(-n // devices)
    if jax.process_count() > 1:
        per_device = int(multihost_utils.process_allgather(np.int64(per_device)).max())
    return max(per_device, 1) * devices


def _stacked_sharding(devices) -> NamedSharding:
    """pmap's layout, without the removed device_put_sharded: the leading axis is one slice per device."""
    return NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))


def _pad(x, rows):
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.concatenate([x, xp.repeat(x[-1:], rows - len(x), axis=0)]) if rows > len(x) else x


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """`vae`'s encode/decode API with the batch split over the devices of `mesh`. Built by `data_parallel`."""
    vae: Autoencoder
    mesh: Mesh
    use_pmap: bool
    params: object  # vae.params on every device: replicated (jit), or stacked one copy per local device (pmap)

    @functools.cached_property
    def _fns(self):
        module = self.vae.module
        fns = {"encode": functools.partial(encode_fn, module), "posterior": functools.partial(posterior_fn, module),
               "decode": functools.partial(decode_fn, module), "decode_uint8": functools.partial(decode_uint8_fn, module),
               "sample": lambda p, x, key: encode_fn(module, p, x, key)}
        if self.use_pmap:
            # one key for the whole batch, a different stream per device
            fns["sample"] = lambda p, x, key: encode_fn(module, p, x, jax.random.fold_in(key, jax.lax.axis_index(AXIS)))
            return {name: jax.pmap(fn, AXIS, in_axes=(0, 0, None)[:3 if name == "sample" else 2],
                                   devices=_local_devices(self.mesh)) for name, fn in fns.items()}
        rows, same = batch_sharding(self.mesh), replicated_sharding(self.mesh)
        return {name: jax.jit(fn, in_shardings=(same, rows, same)[:3 if name == "sample" else 2], out_shardings=rows)
                for name, fn in fns.items()}

    def encode(self, images, key=None, tile=None):
        """As `Autoencoder.encode`, on this process's rows; returns this process's latents."""
        images = self.vae._images(images)
        if tile is not None:
            if key is not None:
                raise ValueError("tiled encoding takes the posterior mean: give key= or tile=, not both")
            out = tiling.tiled_encode(self._call("encode"), images, as_tiling(tile), self.vae.factor)
        elif key is None:
            out = self._call("encode")(images)
        else:
            self.vae._require_posterior()
            out = self._call("sample", key)(images)
        return self.vae._finite(out, "encode")

    def posterior(self, images):
        """As `Autoencoder.posterior`, on this process's rows."""
        self.vae._require_posterior()
        return self.vae._finite(self._call("posterior")(self.vae._images(images)), "encode")

    def decode(self, latents, tile=None):
        """As `Autoencoder.decode`, on this process's rows."""
        latents = self.vae._latents(latents)
        decode = self._call("decode")
        out = decode(latents) if tile is None else tiling.tiled_decode(decode, latents, as_tiling(tile),
                                                                         self.vae.factor)
        return self.vae._finite(out, "decode")

    def decode_uint8(self, latents, tile=None):
        """As `Autoencoder.decode_uint8`, on this process's rows: uint8 (N, H, W, 3), cast on the devices."""
        if tile is not None:
            return to_uint8(self.decode(latents, tile))
        images, finite = self._call("decode_uint8")(self.vae._latents(latents))
        if not bool(np.asarray(finite).all()):
            self.vae._nonfinite("decode")
        return images

    def _call(self, name, *extra):
        """rows -> rows through the parallel function: pad, split over the devices, run, trim."""
        fn = self._fns[name]

        def call(x):
            n = x.shape[0]
            x = _pad(x, _padded_rows(self.mesh, n))
            if self.use_pmap:
                devices = _local_devices(self.mesh)
                x = jax.device_put(x.reshape(len(devices), -1, *x.shape[1:]), _stacked_sharding(devices))
                out = fn(self.params, x, *extra)
                return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:])[:n], out)
            if jax.process_count() == 1:
                out = fn(self.params, jax.device_put(x, batch_sharding(self.mesh)), *extra)
                return jax.tree.map(lambda y: y[:n], out)
            out = fn(self.params, shard_rows(self.mesh, x), *extra)
            return jax.tree.map(lambda y: local_rows(y)[:n], out)
        return call

    def __repr__(self):
        how = "pmap" if self.use_pmap else "jit over a mesh"
        return (f"DataParallel({self.vae!r}, {how}, {self.mesh.devices.size} devices, "
                f"{jax.process_count()} processes)")


def data_parallel(vae: Autoencoder, mesh: Mesh | None = None, use_pmap: bool = False) -> DataParallel:
    """`vae` with the batch split over the first axis of `mesh` (default: every device of every process).

    The result has `vae`'s encode / posterior / decode / decode_uint8 API; each process passes and gets back its
    own rows (NHWC, any count: batches are padded and trimmed).

    use_pmap: run through `jax.pmap` over this process's devices instead of `jax.jit` with shardings (same results;
    for code that still uses pmap)."""
    mesh = default_mesh() if mesh is None else mesh
    if use_pmap:
        devices = _local_devices(mesh)
        stack = lambda p: jax.device_put(np.broadcast_to(np.asarray(p), (len(devices), *p.shape)),
                                         _stacked_sharding(devices))
        return DataParallel(vae, mesh, True, jax.tree.map(stack, vae.params))
    return DataParallel(vae, mesh, False, replicate(mesh, vae.params))
