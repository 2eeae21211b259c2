"""Parallelism for every family over the devices of a mesh, params replicated: the batch split over the devices
(data parallelism), or each image's rows split over them (spatial splitting, exact: `spatial_axis`).

One process or many: after `jax.distributed.initialize()` all processes must call together (each call is one
collective program over the global mesh). Split by batch, every process passes its own images and gets its own
back; counts need not divide the device count, nor be equal across processes: batches are padded and trimmed.
Split by rows, every process passes the same whole batch and gets back the global array, sharded along height.
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


def split_rows_sharding(mesh: Mesh, spatial_axis: str = "space") -> NamedSharding:
    """Images or latents (N, H, W, C) with their rows split over the mesh axis `spatial_axis` and the batch over
    its other axes (if any): the layout `data_parallel(..., spatial_axis=)` takes and returns. Inside your own
    jit, the pure `encode_fn` / `decode_fn` of `DataParallel.module` partition the same way given inputs placed
    with it (`jax.device_put`, or `jax.lax.with_sharding_constraint` on traced values)."""
    batch = tuple(a for a in mesh.axis_names if a != spatial_axis)
    return NamedSharding(mesh, PartitionSpec(batch or None, spatial_axis, None, None))


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
    """`vae`'s encode/decode API split over the devices of `mesh`. Built by `data_parallel`."""
    vae: Autoencoder
    mesh: Mesh
    use_pmap: bool
    params: object  # vae.params on every device: replicated (jit), or stacked one copy per local device (pmap)
    spatial_axis: str | None = None  # the mesh axis that splits rows; None: the batch is split

    @property
    def module(self):
        """The Flax module the parallel calls run: `vae.module`, or with rows split, its `for_split_rows()`."""
        return self.vae.module.for_split_rows() if self.spatial_axis else self.vae.module

    @functools.cached_property
    def _fns(self):
        module = self.module
        fns = {"encode": functools.partial(encode_fn, module), "posterior": functools.partial(posterior_fn, module),
               "decode": functools.partial(decode_fn, module), "decode_uint8": functools.partial(decode_uint8_fn, module),
               "sample": lambda p, x, key: encode_fn(module, p, x, key)}
        if self.use_pmap:
            # one key for the whole batch, a different stream per device
            fns["sample"] = lambda p, x, key: encode_fn(module, p, x, jax.random.fold_in(key, jax.lax.axis_index(AXIS)))
            return {name: jax.pmap(fn, AXIS, in_axes=(0, 0, None)[:3 if name == "sample" else 2],
                                   devices=_local_devices(self.mesh)) for name, fn in fns.items()}
        same = replicated_sharding(self.mesh)
        rows = split_rows_sharding(self.mesh, self.spatial_axis) if self.spatial_axis else batch_sharding(self.mesh)
        # decode_uint8's finite flags (N,) follow the images' batch split
        flags = NamedSharding(self.mesh, PartitionSpec(rows.spec[0]))
        outs = {"decode_uint8": (rows, flags)}
        return {name: jax.jit(fn, in_shardings=(same, rows, same)[:3 if name == "sample" else 2],
                              out_shardings=outs.get(name, rows)) for name, fn in fns.items()}

    def encode(self, images, key=None, tile=None):
        """As `Autoencoder.encode`, on this process's images (split by rows: on the whole batch)."""
        images = self.vae._images(images)
        if tile is not None:
            if key is not None:
                raise ValueError("tiled encoding takes the posterior mean: give key= or tile=, not both")
            out = tiling.tiled_encode(self._call("encode"), images, self._tiling(tile), self.vae.factor)
        elif key is None:
            out = self._call("encode")(images)
        else:
            self.vae._require_posterior()
            out = self._call("sample", key)(images)
        return self.vae._finite(out, "encode")

    def posterior(self, images):
        """As `Autoencoder.posterior`, on this process's images (split by rows: on the whole batch)."""
        self.vae._require_posterior()
        return self.vae._finite(self._call("posterior")(self.vae._images(images)), "encode")

    def decode(self, latents, tile=None):
        """As `Autoencoder.decode`, on this process's latents (split by rows: on the whole batch)."""
        latents = self.vae._latents(latents)
        decode = self._call("decode")
        out = decode(latents) if tile is None else tiling.tiled_decode(decode, latents, self._tiling(tile),
                                                                         self.vae.factor)
        return self.vae._finite(out, "decode")

    def decode_uint8(self, latents, tile=None):
        """As `Autoencoder.decode_uint8`: uint8 (N, H, W, 3), cast on the devices."""
        if tile is not None:
            return to_uint8(self.decode(latents, tile))  # blended on the host
        images, finite = self._call("decode_uint8")(self.vae._latents(latents))
        if not bool(jnp.all(finite)):
            self.vae._nonfinite("decode")
        return images

    def _tiling(self, tile):
        if self.spatial_axis:
            raise ValueError("tile= and splitting rows over devices do not combine: the split already bounds each "
                             "device's memory, exactly; use one or the other")
        return as_tiling(tile)

    def _call(self, name, *extra):
        """inputs -> outputs through the parallel function (split by batch: pad, split, run, trim)."""
        fn = self._fns[name]

        def call(x):
            if self.spatial_axis:
                return fn(self.params, self._place_split_rows(x, name), *extra)
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

    def _place_split_rows(self, x, name):
        """The whole batch (the same in every process) as one global array, rows split over the spatial axis.

        Each device's band of rows must be even at the latent resolution: the layers' 2x2 phase splits (strided
        and upsampling convolutions, pixel shuffles) then stay inside it, where odd bands made XLA regather rows."""
        sharding = split_rows_sharding(self.mesh, self.spatial_axis)
        devices, batch = self.mesh.shape[self.spatial_axis], x.shape[0]
        shards = self.mesh.devices.size // devices
        factor = 1 if name.startswith("decode") else self.vae.factor
        if x.shape[1] % (2 * devices * factor):
            need = (f"latent heights that are multiples of {2 * devices}" if factor == 1 else f"image heights that "
                    f"are multiples of {2 * devices * factor} (latent heights multiples of {2 * devices})")
            raise ValueError(f"splitting rows over the {devices} devices of mesh axis {self.spatial_axis!r} needs "
                             f"{need}, got {x.shape[1]}: crop or pad, or split over fewer devices")
        if batch % shards:
            raise ValueError(f"a batch of {batch} does not split over the {shards} devices of the mesh's other "
                             f"axes {sharding.spec[0]}: pass a multiple of {shards}")
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: np.asarray(x[index]))

    def __repr__(self):
        how = "pmap" if self.use_pmap else "jit over a mesh"
        split = f", rows split over {self.spatial_axis!r}" if self.spatial_axis else ""
        return (f"DataParallel({self.vae!r}, {how}, {self.mesh.devices.size} devices{split}, "
                f"{jax.process_count()} processes)")


def data_parallel(vae: Autoencoder, mesh: Mesh | None = None, use_pmap: bool = False,
                  spatial_axis: str | None = None) -> DataParallel:
    """`vae` split over the devices of `mesh` (default: every device of every process on one axis).

    The result has `vae`'s encode / posterior / decode / decode_uint8 API.

    By default the batch is split over the mesh's first axis: each process passes and gets back its own images
    (NHWC, any count: batches are padded and trimmed).

    spatial_axis: the name of a mesh axis that splits each image's rows instead (the mesh's other axes, if any,
    split the batch): exactly the single-device result, with 1/n of the activations per device, for images too
    large for one device. Inputs are the whole batch, the same in every process, with heights a multiple of twice
    the axis's size in latents; outputs are global arrays laid out by `split_rows_sharding`. Not with `tile=`.

    use_pmap: run through `jax.pmap` over this process's devices instead of `jax.jit` with shardings (same results;
    for code that still uses pmap; batch splitting only)."""
    if spatial_axis is not None:
        mesh = Mesh(np.array(jax.devices()), (spatial_axis,)) if mesh is None else mesh
        if spatial_axis not in mesh.axis_names:
            raise ValueError(f"spatial_axis={spatial_axis!r} is not an axis of the mesh {mesh.axis_names}")
        if use_pmap:
            raise ValueError("use_pmap splits the batch only: splitting rows (spatial_axis) needs jit over a mesh")
        return DataParallel(vae, mesh, False, replicate(mesh, vae.params), spatial_axis)
    mesh = default_mesh() if mesh is None else mesh
    if use_pmap:
        devices = _local_devices(mesh)
        stack = lambda p: jax.device_put(np.broadcast_to(np.asarray(p), (len(devices), *p.shape)),
                                         _stacked_sharding(devices))
        return DataParallel(vae, mesh, True, jax.tree.map(stack, vae.params))
    return DataParallel(vae, mesh, False, replicate(mesh, vae.params))
