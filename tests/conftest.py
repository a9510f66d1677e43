"""Test setup: 8 fake CPU devices (set before jax is imported) and a mesh fixture."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402




@pytest.fixture(scope="session")
def mesh():
  """A (data=4, fsdp=2) mesh over the 8 fake CPU devices, with Auto axes."""
  from uniter_jax import sharding

  assert jax.device_count() == 8, jax.devices()
  return sharding.make_mesh({"data": 4, "fsdp": 2})
