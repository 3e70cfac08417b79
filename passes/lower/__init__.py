"""LOWER: Q/DQ islands rewritten into onnxruntime's integer operators; numerics change by at most one quantization
step."""
