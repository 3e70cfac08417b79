"""QUANTIZE: the passes that write quantization into the graph (Q/DQ pairs, dynamically quantized LSTMs)."""
