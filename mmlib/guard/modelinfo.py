"""What a model is, read from its files without loading it: config.json shapes (Shape), the
safetensors headers' byte counts, the longest context it allows, and where its files are on disk
(a local folder, or the Hugging Face cache's snapshot). No weights, no vLLM, no torch.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

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
    mlp_matrices: int = 3  # gated MLPs (Llama, Qwen) have gate, up and down; GELU ones (Whisper) two
    cross_attention: bool = False  # encoder-decoder: each decoder layer also attends to the encoder
    encoder_positions: int = 0  # tokens of cross-attention KV a request holds (Whisper: 1500)
    encoder_params: int = 0  # the encoder or vision tower and its projector, in parameters
    encoder_width: int = 0  # its hidden size and MLP width (for its activations)
    encoder_intermediate: int = 0
    encoder_tokens: int = 0  # positions the encoder runs over for its largest item (patches, frames)
    mm_item_tokens: int = 0  # the most tokens one image or audio clip becomes (vLLM batches it whole)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Shape | None":
        """The language model's shapes; None where config.json lacks them (encoder-decoders, ...)."""
        text = {**cfg, **(cfg.get("text_config") or {}), **(cfg.get("llm_config") or {})}

        def get(*keys: str, default: Any = None) -> Any:
            return next((text[k] for k in keys if text.get(k) is not None), default)

        if cfg.get("is_encoder_decoder") and cfg.get("decoder_layers") and cfg.get("encoder_layers"):
            return cls._encoder_decoder(cfg)
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
            **_vision_tower(cfg, hidden),
        )

    @classmethod
    def _encoder_decoder(cls, cfg: Mapping[str, Any]) -> "Shape | None":
        """Whisper-style: a GELU encoder over audio frames, a decoder with self and cross attention."""
        d = cfg.get("d_model")
        heads = cfg.get("decoder_attention_heads")
        if not all(isinstance(v, int) and v > 0 for v in (d, heads)):
            return None
        enc_layers, enc_ffn = int(cfg["encoder_layers"]), int(cfg.get("encoder_ffn_dim") or 4 * d)
        positions = int(cfg.get("max_source_positions") or 0)
        mel = int(cfg.get("num_mel_bins") or 80)
        encoder = enc_layers * (4 * d * d + 2 * d * enc_ffn) + positions * d + 3 * d * (mel + d)
        return cls(
            layers=int(cfg["decoder_layers"]), hidden=d, heads=heads, kv_heads=heads, head_dim=d // heads,
            intermediate=int(cfg.get("decoder_ffn_dim") or 4 * d), vocab=int(cfg.get("vocab_size") or 51865),
            tie_embeddings=True, dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
            mlp_matrices=2, cross_attention=True, encoder_positions=positions, encoder_params=encoder,
            encoder_width=d, encoder_intermediate=enc_ffn, encoder_tokens=positions, mm_item_tokens=positions,
        )

    def linear_params(self) -> tuple[int, int]:
        """(attention + MLP matrix parameters per layer, of which in MoE experts)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        if self.cross_attention:
            attn *= 2
        if self.experts:
            moe = 3 * self.hidden * (self.expert_intermediate or self.intermediate) * self.experts
            shared = 3 * self.hidden * self.shared_expert_intermediate
            return attn + moe + shared, moe
        return attn + self.mlp_matrices * self.hidden * self.intermediate, 0

    def weight_bytes(self) -> int:
        """Parameters as vLLM holds them: quantized matrices at their bits plus one 16-bit scale and
        one packed zero point per group; embeddings, norms, the LM head and any encoder or vision
        tower in 16 bits. An fp16/bf16 checkpoint served with quantization "fp8" (vLLM quantizes it
        as it loads) holds its matrices in one byte."""
        per_layer, _ = self.linear_params()
        matrices = per_layer * self.layers
        if self.quant_method in ("awq", "gptq", "awq_marlin", "gptq_marlin", "compressed-tensors") and self.bits < 16:
            matrix_bytes = matrices * (self.bits / 8 + 2 / self.group_size + self.bits / 8 / self.group_size)
        elif self.quant_method in ("fp8", "modelopt", "fbgemm_fp8", "ptpc_fp8"):
            matrix_bytes = matrices
        else:
            matrix_bytes = matrices * 2
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2) * 2
        norms = (2 * self.layers + 1) * self.hidden * 2
        return int(matrix_bytes + embeddings + norms + 2 * self.encoder_params)

    def served_as(self, quantization: Any) -> "Shape":
        """The shape under engine.quantization: "fp8" on a 16-bit checkpoint quantizes it on load."""
        q = str(quantization or "").lower()
        if q in ("fp8", "ptpc_fp8") and not self.quant_method:
            return replace(self, quant_method=q, bits=8)
        return self

    def split(self, cards: int) -> "Shape":
        """One card's part under tensor parallelism over `cards` (vLLM's sharding): the attention
        heads and the MLP's and experts' widths divided; the KV heads too, each card keeping at least
        one (vLLM copies them where there are fewer than cards). An MLA latent and the vocabulary
        (the sampler's logits are gathered whole) stay whole on every card."""
        if cards <= 1:
            return self

        def part(n: int) -> int:
            return -(-n // cards)
        return replace(self, heads=part(self.heads), kv_heads=part(self.kv_heads), intermediate=part(self.intermediate),
                       expert_intermediate=part(self.expert_intermediate),
                       shared_expert_intermediate=part(self.shared_expert_intermediate))

    def splits_over(self, cards: int) -> bool:
        """Whether vLLM can split this model over `cards` by tensor parallelism: the attention heads
        divide evenly, and the KV heads do, or the cards divide evenly among them."""
        kv = self.kv_heads
        return cards >= 1 and self.heads % cards == 0 and (kv % cards == 0 or cards % kv == 0)

    def kv_bytes_per_token(self, kv_dtype_bytes: float) -> int:
        if self.kv_lora_rank:  # MLA caches one latent vector (plus the RoPE part) per layer
            return int(self.layers * (self.kv_lora_rank + self.rope_head_dim) * kv_dtype_bytes)
        return int(self.layers * self.kv_heads * self.head_dim * 2 * kv_dtype_bytes)



def _vision_tower(cfg: Mapping[str, Any], text_hidden: int) -> dict[str, int]:
    """The vision tower of a vision-language model (Pixtral, SigLIP, CLIP-style): its parameters, its
    width, and how many tokens its largest image becomes; {} for text-only models."""
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        return {}
    h = v.get("hidden_size") or v.get("embed_dim") or v.get("hidden")
    layers = v.get("num_hidden_layers") or v.get("depth")
    if not all(isinstance(x, int) and x > 0 for x in (h, layers)):
        return {}
    inter = v.get("intermediate_size") or int(h * float(v.get("mlp_ratio") or 4))
    gated = str(v.get("hidden_act", "")).lower() in ("silu", "swiglu")
    patch, size = int(v.get("patch_size") or 14), v.get("image_size")
    merge = int(cfg.get("spatial_merge_size") or v.get("spatial_merge_size") or 1)
    channels = int(v.get("num_channels") or 3)
    tower = layers * (4 * h * h + (3 if gated else 2) * h * inter) + channels * patch * patch * h
    projector = merge * merge * h * h + h * text_hidden + text_hidden * text_hidden
    patches = (int(size) // patch) ** 2 if isinstance(size, int) else 0
    return {"encoder_params": tower + projector, "encoder_width": h, "encoder_intermediate": inter,
            "encoder_tokens": patches, "mm_item_tokens": patches // (merge * merge)}


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
            "max_seq_length", "seq_len", "max_target_positions")
    found = [int(cfg[k]) for k in keys if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)]
    return min(found) if found else None


def context_limit(cfg: Mapping[str, Any] | None) -> int | None:
    """The longest context to size for: model_max_len, else the config's position count as is
    (scaled RoPE configs, e.g. Llama 3.1's, already state the stretched length there)."""
    exact = model_max_len(cfg)
    if exact or not cfg:
        return exact
    text = {**cfg, **(cfg.get("text_config") or {})}
    n = text.get("max_position_embeddings")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
