"""What a model is, read from its files without loading it: config.json shapes (Shape), the
safetensors headers' byte counts, the longest context it allows, and where its files are on disk
(a local folder, or the Hugging Face cache's snapshot). No weights, no vLLM, no torch.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mmlib.models.cache import hf_hub_cache, model_dir  # noqa: F401 (re-exported)

# Bytes per element of safetensors dtypes (headers say "BF16", "I32", ...).
ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8, "F4": 0.5}
FLOAT_ST = ("F64", "F32", "F16", "BF16")

# --- the shapes -------------------------------------------------------------------------------------
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



# --- finding the model's files without downloading: mmlib.models.cache (re-exported) ------------------


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


def model_max_len(cfg: Mapping[str, Any] | None) -> int | None:
    """The longest context the model's config allows, as vLLM derives it; None where unsure (RoPE
    scaling stretches it in ways not worth copying here)."""
    if not cfg:
        return None
    cfg = {**cfg, **(cfg.get("text_config") or {})}
    for rope in (cfg.get("rope_scaling"), cfg.get("rope_parameters")):
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
            return None
    keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
            "max_seq_length", "seq_len")
    found = [int(cfg[k]) for k in keys if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)]
    return min(found) if found else None
