"""lm-eval task YAMLs for air-gapped zero-shot evaluation (see :mod:`hbllm.tasks.local`)."""
