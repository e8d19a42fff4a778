"""Models on disk and on the hub: where the Hugging Face cache keeps them, pulling them with
progress and a disk-space check first, what a model is before it is downloaded (config.json and
safetensors headers by range requests), listing and removing cached models.

cache.py answers from the disk alone (no huggingface_hub import: the CLI's fast path); hub.py talks
to the hub through huggingface_hub.
"""
