"""`kdpipe audit`: what a cached label artifact is worth before training on it (calibration, the
KD temperature it suggests, accuracy against gold, augmentation and ensemble agreement, likely
gold-label errors, top-k cache fidelity)."""
