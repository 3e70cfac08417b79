"""Weight-only quantization of decoder LLMs: block-wise 4-bit (or 8-bit) weights, activations stay float.

Every MatMul/Gemm with a constant 2-D weight ``W [K, N]`` (MatMul orientation: K inputs, N outputs) is quantized in
blocks of ``block_size`` consecutive inputs per output column (:mod:`qgraph.quant.blockwise`), by one of three
algorithms:

- :mod:`.rtn`: round to nearest, optionally with a per-block clipping ratio searched for the least squared error;
- :mod:`.gptq`: GPTQ, which rounds one input row at a time and spreads each row's rounding error over the rows not
  yet rounded through the inverse of the layer's Hessian ``H = 2XᵀX`` (streamed over the calibration batches);
- :mod:`.awq`: activation-aware scaling: per-input-channel scales searched on the activation magnitudes, folded
  into the producer of the layer's input, then RTN or GPTQ on the scaled weight.

:mod:`.statistics` streams the layer inputs of the calibration prompts through onnxruntime (prefill through the
KV-cache graph, :mod:`.feeds` builds the empty past) into per-input Hessians; :mod:`.driver` runs the whole flow
and the passes that write it into the graph: ``ApplyInputChannelScales`` (AWQ's folds), ``QuantizeWeightsBlockwise``
(blocked DequantizeLinear → MatMul at opset 21) and, for onnxruntime CPU, ``LowerMatMulNBits`` (packed 4-bit
``com.microsoft.MatMulNBits``).
"""
