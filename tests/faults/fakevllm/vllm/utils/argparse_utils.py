"""The fake's stand-in for vLLM's FlexibleArgumentParser (mm's vllm_args helper imports it)."""
import argparse

FlexibleArgumentParser = argparse.ArgumentParser
