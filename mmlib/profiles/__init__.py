"""Profiles: what to serve and how. TOML files loaded, `extends` merged and validated into a
Profile (profile), mm's own settings (config), a profile turned into the vLLM server's argv and
environment, the one place flags are spelled (vllm_cmd), the installed vLLM's own argument parser
(vllm_args), and the embedded model (embedded).

Below everything but mmlib.system, mmlib.paths and mmlib.errors: it imports no other mm package.
"""
