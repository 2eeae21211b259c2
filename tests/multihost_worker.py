"""One process of the two-process data-parallel test (tests/test_parallel.py).

Joins the job described by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, takes its own
(uneven) share of the images in argv[1], encodes and decodes it over the global mesh (jit) and over its local
devices (pmap); then, with each image's rows split over all devices of both processes, encodes and decodes
the whole batch with taef2 (every process passes the same images); saves what it got to argv[2]/process<i>.npz."""
import os
import sys

import jax

jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                           int(os.environ["JAX_PROCESS_ID"]))

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import flax_vae  # noqa: E402

images = np.load(sys.argv[1])
rows = np.array_split(np.arange(len(images)), jax.process_count())[jax.process_index()]
vae = flax_vae.load("taesd")
sharded = flax_vae.data_parallel(vae)
assert sharded.mesh.devices.size == jax.device_count() == 2 * jax.local_device_count()
latents = sharded.encode(images[rows])
decoded = sharded.decode(latents)
pmapped = flax_vae.data_parallel(vae, use_pmap=True)
split_rows = flax_vae.data_parallel(flax_vae.load("taef2"), spatial_axis="space")
split_latents = split_rows.encode(images)
split_decoded = split_rows.decode(split_latents)
assert not split_decoded.is_fully_addressable  # one global array over both processes' devices
gather = lambda x: multihost_utils.process_allgather(x, tiled=True)
np.savez(os.path.join(sys.argv[2], f"process{jax.process_index()}.npz"), rows=rows, latents=latents,
         decoded=decoded, latents_pmap=pmapped.encode(images[rows]), split_latents=gather(split_latents),
         split_decoded=gather(split_decoded))
print(sharded)
