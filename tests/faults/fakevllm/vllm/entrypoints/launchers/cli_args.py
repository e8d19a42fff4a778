"""The fake vLLM's serve arguments: what mm's vllm_args helper reads as "the installed vLLM's parser"."""
import argparse


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--uds", default=None, help="Unix domain socket path.")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--api-key", nargs="+", default=None)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--kv-cache-memory-bytes", type=int)
    parser.add_argument("--max-cudagraph-capture-size", type=int)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction)
    parser.add_argument("--load-format")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    return parser
