"""CANONICALIZE: FP32 rewrites that keep the model's numerics (constants, dead code, BatchNorm folding, fusions)."""
