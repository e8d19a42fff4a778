"""mm: a local model manager for vLLM."""
__version__ = "0.1.0"
