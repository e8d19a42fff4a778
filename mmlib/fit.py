"""Will a profile fit its share of the GPU? An estimate from the model's config.json and safetensors
headers (no weights loaded, no vLLM, no torch), in vLLM's own terms:

    KV cache = total GPU memory x gpu_memory_utilization - weights - activation peak - overhead
    tokens   = KV cache / (layers x kv heads x head dim x 2 (K and V) x bytes per KV element)

and from the tokens, how many requests of max_model_len fit at once. Checked against what vLLM
0.26 printed on an H100 (tests/unit/test_fit.py): within a few percent.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mmlib.rules import engine_int, model_max_len

GIB = 1 << 30

# Bytes per element of safetensors dtypes (headers say "BF16", "I32", ...).
ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8, "F4": 0.5}
FLOAT_ST = ("F64", "F32", "F16", "BF16")

# --- the overhead vLLM keeps beside weights and KV cache ---------------------------------------------
# Calibrated on an H100 with vLLM 0.26 (the DEBUG log of its memory profiler, 2026-11-24), two models
# of different width served with defaults (max_num_batched_tokens 8192):
#   dummy-1.5b (hidden 1536, intermediate 8960):  weights 2.68 GiB, torch peak +0.56, non-torch +0.22
#   dummy-7b-awq (hidden 3584, intermediate 18944): weights 4.03 GiB, torch peak +1.08, non-torch +0.22
# and both times the KV cache came out a further 0.06 GiB short (its CUDA graph memory estimate).
# - "weights" as vLLM counts them include persistent buffers sized by the batch: the parameter bytes
#   alone are 2.58 and 3.81 GiB, and the gaps (0.094 and 0.219 GiB) are 8 bytes x hidden x 8192
#   tokens for both, i.e. about four 16-bit tensors of max_num_batched_tokens x hidden.
# - the activation peak of the profiling pass grows with max_num_batched_tokens: the MLP's gate/up
#   and activation outputs (3 x intermediate) plus two hidden-sized tensors a token, in 16 bits,
#   and ~0.1 GiB fixed (sampler, logits). Two runs fix the two numbers; runs with max_num_seqs 16 or
#   64 and max_model_len 4096 printed the same peak, so neither enters. Below 70 GiB cards vLLM
#   batches 2048 tokens by default, and the same formula is used there (an extrapolation).
# - non-torch memory (cuBLAS/NCCL workspaces) and the CUDA graph pool are constants.
BUFFER_BYTES_PER_HIDDEN = 8
ACTIVATION_FIXED = int(0.1027 * GIB)
NON_TORCH = int(0.22 * GIB)
CUDA_GRAPHS = int(0.06 * GIB)
KV_BLOCK = 16  # vLLM allocates KV in blocks of 16 tokens


def parse_size(text: str) -> int:
    """"12GiB", "12G", "12GB", "11000MiB", "12" (GiB) -> bytes. Binary throughout: a "12 GB" card
    has 12 GiB, as card makers mean it."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (write it like 12GiB or 11000MiB)")
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 3
    return int(float(m.group(1)) * (1 << (10 * power)))


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# --- the model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    dtype: str  # as stored: "bfloat16", "float16", "float32"
    quant_method: str = ""
    bits: int = 16
    group_size: int = 128
    experts: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    kv_lora_rank: int = 0  # MLA (DeepSeek): a compressed KV cache per layer instead of heads
    rope_head_dim: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Shape | None":
        """The language model's shapes; None where config.json lacks them (encoder-decoders, ...)."""
        text = {**cfg, **(cfg.get("text_config") or {}), **(cfg.get("llm_config") or {})}

        def get(*keys: str, default: Any = None) -> Any:
            return next((text[k] for k in keys if text.get(k) is not None), default)

        hidden = get("hidden_size", "d_model", "n_embd")
        layers = get("num_hidden_layers", "n_layer")
        heads = get("num_attention_heads", "n_head")
        if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads)):
            return None
        qc = cfg.get("quantization_config") or text.get("quantization_config") or {}
        method = str(qc.get("quant_method", "")).lower()
        return cls(
            layers=layers, hidden=hidden, heads=heads,
            kv_heads=get("num_key_value_heads", default=heads),
            head_dim=get("head_dim", default=hidden // heads),
            intermediate=get("intermediate_size", "ffn_dim", default=4 * hidden),
            vocab=get("vocab_size", default=32000),
            tie_embeddings=bool(get("tie_word_embeddings", default=False)),
            dtype=str(get("torch_dtype", "dtype", default="bfloat16")),
            quant_method=method, bits=int(qc.get("bits", qc.get("w_bit", 4 if method else 16))),
            group_size=int(qc.get("group_size", qc.get("q_group_size", 128)) or 128),
            experts=get("num_local_experts", "num_experts", "n_routed_experts", default=0) or 0,
            expert_intermediate=get("moe_intermediate_size", default=0) or 0,
            shared_expert_intermediate=get("shared_expert_intermediate_size", default=0) or 0,
            kv_lora_rank=get("kv_lora_rank", default=0) or 0,
            rope_head_dim=get("qk_rope_head_dim", default=0) or 0,
        )

    def linear_params(self) -> tuple[int, int]:
        """(attention + MLP matrix parameters per layer, of which in MoE experts)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        if self.experts:
            moe = 3 * self.hidden * (self.expert_intermediate or self.intermediate) * self.experts
            shared = 3 * self.hidden * self.shared_expert_intermediate
            return attn + moe + shared, moe
        return attn + 3 * self.hidden * self.intermediate, 0

    def weight_bytes(self) -> int:
        """Parameters as vLLM holds them: quantized matrices at their bits plus one 16-bit scale and
        one packed zero point per group; embeddings, norms and the LM head in 16 bits."""
        per_layer, _ = self.linear_params()
        matrices = per_layer * self.layers
        if self.quant_method in ("awq", "gptq", "awq_marlin", "gptq_marlin", "compressed-tensors") and self.bits < 16:
            matrix_bytes = matrices * (self.bits / 8 + 2 / self.group_size + self.bits / 8 / self.group_size)
        elif self.quant_method in ("fp8", "modelopt", "fbgemm_fp8"):
            matrix_bytes = matrices
        else:
            matrix_bytes = matrices * 2
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2) * 2
        norms = (2 * self.layers + 1) * self.hidden * 2
        return int(matrix_bytes + embeddings + norms)

    def kv_bytes_per_token(self, kv_dtype_bytes: float) -> int:
        if self.kv_lora_rank:  # MLA caches one latent vector (plus the RoPE part) per layer
            return int(self.layers * (self.kv_lora_rank + self.rope_head_dim) * kv_dtype_bytes)
        return int(self.layers * self.kv_heads * self.head_dim * 2 * kv_dtype_bytes)

    def activation_bytes(self, batched_tokens: int) -> int:
        width = 3 * (self.expert_intermediate or self.intermediate) if self.experts else 3 * self.intermediate
        return int(2 * batched_tokens * (width + 2 * self.hidden)) + ACTIVATION_FIXED


# --- finding the model's files without downloading ---------------------------------------------------
def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def model_dir(model: str) -> Path | None:
    """A local folder with the model's config.json: the path itself, or its hub cache snapshot."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local if (local / "config.json").is_file() else None
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    repo = hf_hub_cache() / f"models--{model.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    snaps = sorted((p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    return snaps[0] if snaps else None


def read_config(folder: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def safetensors_files(folder: Path) -> list[Path] | None:
    """The checkpoint's safetensors files, or None where there are none or some are missing."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        files = [folder / n for n in sorted(names)]
        return files if all(f.is_file() for f in files) else None
    files = sorted(folder.glob("*.safetensors"))
    return files or None


def safetensors_bytes(files: list[Path], float_bytes: int = 2) -> int | None:
    """Parameter bytes from the headers alone (8-byte length, then JSON): floating-point tensors at
    the served dtype's size (vLLM casts fp32 checkpoints), others (packed ints, fp8) as stored."""
    total = 0.0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 * 1024 * 1024:
                    return None
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for name, t in header.items():
            if name == "__metadata__":
                continue
            numel = math.prod(t.get("shape") or [1])
            dtype = t.get("dtype", "BF16")
            total += numel * (float_bytes if dtype in FLOAT_ST else ST_BYTES.get(dtype, 2))
    return int(total)


# --- the estimate ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    total: int  # GPU memory, bytes
    share: float
    weights: int
    weights_from: str  # "safetensors headers" or "config.json shapes"
    activation: int
    overhead: int  # non-torch, CUDA graphs and per-token buffers
    kv_per_token: int
    kv_dtype: str
    max_model_len: int | None
    max_num_seqs: int | None

    @property
    def budget(self) -> int:
        return math.ceil(self.total * self.share)

    @property
    def kv_cache(self) -> int:
        return self.budget - self.weights - self.activation - self.overhead

    @property
    def tokens(self) -> int:
        return max(0, self.kv_cache) // self.kv_per_token // KV_BLOCK * KV_BLOCK

    @property
    def concurrency(self) -> float | None:
        return self.tokens / self.max_model_len if self.max_model_len else None

    @property
    def fits(self) -> bool:
        return self.kv_cache > 0 and (self.max_model_len is None or self.tokens >= self.max_model_len)

    def share_needed(self, tokens: int) -> float:
        return (self.weights + self.activation + self.overhead + tokens * self.kv_per_token) / self.total

    def summary(self) -> str:
        head = (f"{gib(self.budget)} budget ({self.share:g} of {gib(self.total)}) - weights {gib(self.weights)} "
                f"- activations and overhead {gib(self.activation + self.overhead)} = KV cache {gib(self.kv_cache)}")
        if self.kv_cache <= 0:
            return head
        s = f"{head}: {self.tokens:,} tokens ({self.kv_dtype} KV, {self.kv_per_token:,} bytes a token)"
        if self.concurrency is not None:
            s += f", {self.concurrency:.1f} requests of {self.max_model_len:,} tokens at once"
        return s

    def remedies(self) -> list[str]:
        """What would fit, most direct first."""
        out = []
        if self.kv_cache > 0 and self.tokens >= 1024:
            out.append(f"max_model_len = {self.tokens // 1024 * 1024}")
        if not self.kv_dtype.startswith("fp8"):
            out.append(f'kv_cache_dtype = "fp8" (halves the KV cache per token: {self.tokens * 2:,} tokens)')
        want = self.max_model_len or KV_BLOCK
        share = self.share_needed(want)
        if share <= 0.95:
            out.append(f"gpu_memory_utilization = {math.ceil(share * 100) / 100:g}")
        else:
            out.append("a smaller or more quantized model (the weights alone take "
                       f"{self.weights / self.total:.0%} of the card)")
        return out


def kv_bytes(kv_cache_dtype: Any, dtype: str) -> tuple[str, float]:
    d = str(kv_cache_dtype or "auto").lower()
    if d.startswith("fp8") or d in ("int8", "fp8_e4m3", "fp8_e5m2"):
        return "fp8", 1
    if d == "auto":
        return ("fp32" if dtype == "float32" else "16-bit"), 2  # vLLM serves fp32 checkpoints in 16 bits
    return d, 2


def default_batched_tokens(total: int) -> int:
    """vLLM's default max_num_batched_tokens for `vllm serve`: 8192 on cards of 70 GiB and more."""
    return 8192 if total >= 70 * GIB else 2048


def estimate(engine: Mapping[str, Any], cfg: Mapping[str, Any], total: int,
             folder: Path | None = None, load_format: str | None = None) -> Fit | None:
    """The fit of a model (its config.json, and its folder for safetensors) under an [engine] table
    on a card of `total` bytes; None where the config lacks the shapes to say."""
    shape = Shape.from_config(cfg)
    if shape is None:
        return None
    dtype = str(engine.get("dtype", "auto")).lower()
    if dtype in ("auto", ""):
        dtype = shape.dtype
    kv_name, kv_size = kv_bytes(engine.get("kv_cache_dtype"), dtype)
    weights, source = None, "config.json shapes"
    files = safetensors_files(folder) if folder and (load_format or engine.get("load_format")) != "dummy" else None
    if files:
        weights = safetensors_bytes(files)
        source = "safetensors headers"
    if weights is None:
        weights, source = shape.weight_bytes(), "config.json shapes"
    batched = engine_int(engine.get("max_num_batched_tokens")) or default_batched_tokens(total)
    overhead = NON_TORCH + (0 if engine.get("enforce_eager") is True else CUDA_GRAPHS) \
        + BUFFER_BYTES_PER_HIDDEN * shape.hidden * batched
    max_len = engine_int(engine.get("max_model_len"))
    max_len = max_len if max_len and max_len > 0 else model_max_len(cfg)  # -1 and "auto": the model's own
    share = engine.get("gpu_memory_utilization", 0.9)
    return Fit(total=total, share=float(share), weights=weights, weights_from=source,
               activation=shape.activation_bytes(batched), overhead=overhead,
               kv_per_token=shape.kv_bytes_per_token(kv_size), kv_dtype=kv_name, max_model_len=max_len,
               max_num_seqs=engine_int(engine.get("max_num_seqs")))
