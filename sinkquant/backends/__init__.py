"""Real execution of sinkquant's quantized models: integer weights in storage and integer kernels at run time
(`native`), an int8 KV cache (`kv_cache`), and the exports serving runtimes load (`export`: compressed-tensors for
vLLM, `onnx_export` / `onnx_runtime` for ONNX Runtime). This package's own import is torch-free, so the CLI can
refuse a bad --format or --onnx-peers before torch loads."""

FORMATS = ("compressed-tensors", "onnx")
ONNX_PEERS = ("minmax", "percentile", "entropy", "dynamic")  # ONNX Runtime's own int8 (export.onnx_peers)
