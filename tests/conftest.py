"""Test set-up: 8 virtual CPU devices, so sharding runs on (2, 4) and (8, 1) meshes.

Must run before jax is imported anywhere, which conftest.py does (pytest loads it first).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
