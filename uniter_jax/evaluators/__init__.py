"""Host-side metrics and result files of the fine-tuning tasks (no JAX in here)."""
