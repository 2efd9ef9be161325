"""Parallel strategies, each an `apply_<strategy>(model, ...)` applied from outside the model."""
