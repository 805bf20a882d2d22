"""cxrjax: chest X-ray foundation models in JAX/Flax."""

import flax

# Parameters carry *logical* axis names (see cxrjax/parallel.py); cxrjax places
# them on the mesh itself through one rules table, so Flax must not try to
# shard variables eagerly with those names as if they were mesh axes.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
