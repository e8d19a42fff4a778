"""The variables the fake vLLM reads (mm's vllm_args helper lists them)."""
environment_variables = {"VLLM_SERVER_DEV_MODE": None, "VLLM_API_KEY": None, "VLLM_TARGET_DEVICE": None}
