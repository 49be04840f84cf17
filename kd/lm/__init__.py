"""Causal-LM distillation: codecs for sparse teacher token distributions, their losses, and the
small helpers (tokenizers, windows, models) the `lm_*` stages and `train_lm` share."""
