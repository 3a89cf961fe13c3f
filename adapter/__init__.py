"""Stages two and three: the ranking-aware adapter, its training, the baselines, evaluation and experiments."""

# The method name of the ranking adapter itself: `rankpipe train --method`, a checkpoint's `method`,
# a bench variant's. Every other method name is a baseline's (adapter/baselines).
ADAPTER_METHOD = "adapter"
