"""Real execution of sinkquant's quantized models: integer weights in storage and integer kernels at run time
(`native`), an int8 KV cache (`kv_cache`) and an export serving engines load (`export`)."""
