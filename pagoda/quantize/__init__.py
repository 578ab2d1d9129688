"""``pagoda quantize``: write GPTQ / AWQ checkpoints (real GPTQ and AWQ over a calibration text, or round to
nearest for int8 / int4) that Pagoda, vLLM and transformers load."""
