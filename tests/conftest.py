"""Test setup: 8 fake CPU devices (set before jax is imported) and a mesh fixture."""

import os

# Cheaper code generation: the tests' programs are small, so compiling them costs far more
# than running them; the numerics (float32, no fast math) are unchanged. XLA:CPU's older
# elemental emitters (fusion emitters off) compile the tests' programs in about half the time.
COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
    + COMPILE_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Identical programs (the trainer runs of the resume test, say) compile once per session.
CACHE_DIR = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                  tempfile.mkdtemp(prefix="uniter_jax_cache_"))
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# The longest test files first: the two test processes (pytest-xdist, one file at a time) then
# finish together instead of one waiting on a long file scheduled last. Measured with
# --durations; the order changes the wall time only, never what runs.
LONGEST_FIRST = ("test_trainer.py", "test_notebooks.py", "test_pair_tasks.py",
                 "test_vqa_finetune.py", "test_train_step.py", "test_inference.py",
                 "test_reliability.py", "test_vcr.py", "test_retrieval.py",
                 "test_parity_official.py", "test_re_task.py", "test_model.py",
                 "test_multihost.py", "test_tfds.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept




@pytest.fixture(scope="session")
def mesh():
  """A (data=4, fsdp=2) mesh over the 8 fake CPU devices, with Auto axes."""
  from uniter_jax import sharding

  assert jax.device_count() == 8, jax.devices()
  return sharding.make_mesh({"data": 4, "fsdp": 2})


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
  """A small synthetic world (120 images, 64-d features) shared by the trainer tests."""
  from data_prep import synthetic

  out = tmp_path_factory.mktemp("tiny_world") / "world"
  synthetic.generate(str(out), num_images=120, seed=0, img_dim=64, workers=1,
                     log=lambda *_: None)
  return str(out)
