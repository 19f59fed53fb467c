"""Training and evaluation data: cases on disk, per-slice labels and splits, compact slice sets, phantoms."""
