"""The measured figures guard.fit predicts with: one row each, naming the result of record it comes
from (benchmark_results/) and why it has its value. A new run that moves a figure changes its row.

The formulas that use them (fit.activation_bytes, graph_bytes, ...) say in a line what they model;
the runs behind them are whole in the result files, not retold here.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmlib.profiles.memory import GIB


@dataclass(frozen=True)
class Figure:
    value: int
    source: str  # under benchmark_results/, or where the figure came from if no file was kept
    why: str


# vLLM 0.26 on an H100, two random-weight models served with defaults (dummy 1.5B, hidden 1536; 7B AWQ,
# hidden 3584): its memory profiler's DEBUG log; the fit it gives is checked in check_on_gpu_h100.txt.
PROFILER = "vLLM 0.26's memory profiler log, H100, 2026-11-24 (checked: check_on_gpu_h100.txt)"
# Every shipped profile on a 12 GiB card (benchmarks/card12.py), first starts, torch.compile from scratch.
CARD12 = "card12_h100_run1.txt"
CARD12_LOG = "card12_h100_run1.vllm.log"

FIGURES = {
    "BUFFER_BYTES_PER_HIDDEN": Figure(
        64 << 10, PROFILER, "vLLM's loaded weights exceed the parameters by 0.094 and 0.219 GiB: 64 KiB per "
        "unit of hidden width for both, whatever the batch"),
    "ACTIVATION_FIXED": Figure(
        int(0.1027 * GIB), PROFILER, "the profiling pass's peak beyond its MLP and hidden outputs a token "
        "(sampler, logits): two widths fix it and the per-token part"),
    "NON_TORCH": Figure(int(0.22 * GIB), PROFILER, "cuBLAS/NCCL workspaces: +0.22 GiB for both models"),
    "CUDA_GRAPHS": Figure(
        int(0.06 * GIB), PROFILER, "vLLM's own estimate of its graphs, taken off the KV cache: 0.06 GiB short "
        "both times"),
    "CUDA_CONTEXT": Figure(
        int(0.51 * GIB), CARD12, "at rest every server held 0.83-0.92 GiB beyond weights, KV cache and graphs; "
        "the eager default's 0.83 less NON_TORCH and ACTIVATION_FIXED"),
    "COMPILED_KERNELS": Figure(
        int(0.06 * GIB), CARD12, "torch.compile's generated kernels: compiled servers kept 0.88-0.92 GiB where "
        "the eager one kept 0.83"),
    "SAMPLER_BYTES": Figure(
        15, CARD12_LOG, "four eager starts at 1024 sequences kept 12.7-15.8 bytes a (sequence x vocabulary "
        "entry)"),
    "GRAPH_FIXED": Figure(
        int(0.04 * GIB), CARD12_LOG, "the graph pool's fixed part: with graph_bytes it gives the 7B 0.07 / 0.15 "
        "/ 0.47 GiB at capture 16 / 64 / 256, vLLM printed 0.07 / 0.21 / 0.44"),
    "COMPILE_RESERVE": Figure(
        4, CARD12, "full-batch decoder activations torch.compile leaves reserved beside the KV cache: perf's "
        "first start died on 1.12 GiB of them; 4 gives the 7B 1.0 GiB at 2048 tokens"),
    "FLASHINFER_WORKSPACE": Figure(
        int(0.44 * GIB), CARD12_LOG, "FlashInfer (perf) keeps its 394 MiB workspace and per-batch buffers "
        "beside the KV cache: sleep freed 5.09 GiB for a 4.65 GiB cache"),
    "ASLEEP_BASE": Figure(
        int(0.79 * GIB), CARD12, "asleep (level 1) a server kept this plus its graphs: chat 0.90, ocr 0.90, "
        "default 0.78; level 2 keeps the same on the GPU"),
}
BUFFER_BYTES_PER_HIDDEN = FIGURES["BUFFER_BYTES_PER_HIDDEN"].value
ACTIVATION_FIXED = FIGURES["ACTIVATION_FIXED"].value
NON_TORCH = FIGURES["NON_TORCH"].value
CUDA_GRAPHS = FIGURES["CUDA_GRAPHS"].value
CUDA_CONTEXT = FIGURES["CUDA_CONTEXT"].value
COMPILED_KERNELS = FIGURES["COMPILED_KERNELS"].value
SAMPLER_BYTES = FIGURES["SAMPLER_BYTES"].value
GRAPH_FIXED = FIGURES["GRAPH_FIXED"].value
COMPILE_RESERVE = FIGURES["COMPILE_RESERVE"].value
FLASHINFER_WORKSPACE = FIGURES["FLASHINFER_WORKSPACE"].value
ASLEEP_BASE = FIGURES["ASLEEP_BASE"].value

# mm's own choices, not measurements: shared by the prediction and the advice.
KV_BLOCK = 16  # vLLM allocates KV in blocks of 16 tokens
HEADROOM = 512 << 20  # what "fill" leaves free, and the margin under which a fit is called tight
MIN_FIT_CONTEXT = 1024
# NCCL's and vLLM's custom all-reduce buffers on each card of a tensor-parallel server: an estimate,
# not yet measured (benchmarks/dp_vs_tp.py prints the prediction beside what each card held).
ALL_REDUCE = 256 << 20
