"""ANNOTATE: which tensors get which quantization spec (the target's rules, the user's overrides and config file)."""
