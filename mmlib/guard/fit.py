"""Will a profile fit the card? Predicted from the model's config.json and safetensors headers (no
weights loaded, no vLLM, no torch), in two steps:

- the card mm may use (guard/card.py): NVML's total, or config.toml's gpu_budget below it;
- the server's footprint on it (`predict` -> Prediction): weights, KV cache, CUDA graphs, activations
  and CUDA context awake; what stays on the GPU asleep; host RAM. For a profile with a [memory]
  table it also works out the exact sizes (Prediction.sizes: the KV cache's bytes, the CUDA graph
  capture size, a share that passes vLLM's start check), which profiles/vllm_cmd.server_argv turns
  into flags.

A profile without [memory] gives vLLM a share of the card (gpu_memory_utilization); `predict` then
works out what vLLM makes of it (the KV cache is what its profiler leaves of the share), as checked
against what vLLM 0.26 printed on an H100 (tests/unit/test_fit.py). The measured figures are a table in
guard/calibration.py, each naming its result file; what would fit instead is guard/advice.py's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from mmlib.guard.advice import advise
from mmlib.guard.calibration import (
    ACTIVATION_FIXED,
    ALL_REDUCE,
    ASLEEP_BASE,
    BUFFER_BYTES_PER_HIDDEN,
    COMPILE_RESERVE,
    COMPILED_KERNELS,
    CUDA_CONTEXT,
    CUDA_GRAPHS,
    FLASHINFER_WORKSPACE,
    GRAPH_FIXED,
    HEADROOM,
    KV_BLOCK,
    MIN_FIT_CONTEXT,
    NON_TORCH,
    SAMPLER_BYTES,
)
from mmlib.guard.card import Card, card, card_capacity, host_ram, sized_card  # noqa: F401 (callers say fit.card)
from mmlib.guard.modelinfo import (
    FLOAT_ST,
    ST_BYTES,
    Shape,
    context_limit,
    safetensors_bytes,
    safetensors_files,
)
from mmlib.profiles.memory import GIB, gib
from mmlib.profiles.profile import DEFAULT_SHARE, Profile
from mmlib.profiles.vllm_args import ArgSpec
from mmlib.profiles.vllm_cmd import Sizes, accepts, engine_int, size_flag


# --- the overhead vLLM keeps beside weights and KV cache (figures: guard/calibration.py) ----------------
def _mlp_width(shape: Shape) -> int:
    return shape.mlp_matrices * (shape.expert_intermediate or shape.intermediate if shape.experts
                                 else shape.intermediate)


def activation_bytes(shape: Shape, batched_tokens: int) -> int:
    """The profiling pass's activation peak: the MLP's gate/up and activation outputs plus two
    hidden-sized tensors a token, in 16 bits, and a fixed part (sampler, logits). An encoder or
    vision tower runs before the decoder on its largest item; the larger of the two counts."""
    encoder = 2 * shape.encoder_tokens * (3 * shape.encoder_intermediate + 2 * shape.encoder_width)
    return int(max(decoder_activation_bytes(shape, batched_tokens), encoder)) + ACTIVATION_FIXED


def decoder_activation_bytes(shape: Shape, batched_tokens: int) -> int:
    """The decoder's part of a full batch: the MLP's outputs and two hidden-sized tensors a token."""
    return 2 * batched_tokens * (_mlp_width(shape) + 2 * shape.hidden)


def hub_weight_bytes(parameter_counts: Mapping[str, int], float_bytes: int = 2) -> int:
    """Parameter bytes from the hub's safetensors headers ({"BF16": n, "I32": m}, as
    huggingface_hub's get_safetensors_metadata counts them), the way safetensors_bytes counts a
    local checkpoint: floating-point tensors at the served dtype's size, others as stored."""
    return int(sum(n * (float_bytes if dtype in FLOAT_ST else ST_BYTES.get(dtype, 2))
                   for dtype, n in parameter_counts.items()))


def weights_of(shape: Shape, engine: Mapping[str, Any], folder: Path | None,
               load_format: str | None = None) -> tuple[int, str]:
    """(parameter bytes, where from): the safetensors headers where the checkpoint is on disk and
    served as stored, else the config.json shapes."""
    dummy = (load_format or engine.get("load_format")) == "dummy"
    requantized = shape.served_as(engine.get("quantization")) is not shape
    counts = getattr(folder, "parameter_counts", None)  # the hub's headers, for a model not yet pulled
    if counts and not dummy and not requantized:
        return hub_weight_bytes(counts), "the hub's safetensors headers"
    local = folder if isinstance(folder, Path) else None
    files = safetensors_files(local) if local and not dummy and not requantized else None
    weights = safetensors_bytes(files) if files else None
    if weights is not None:
        return weights, "safetensors headers"
    return shape.served_as(engine.get("quantization")).weight_bytes(), "config.json shapes"


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


# --- the footprint -------------------------------------------------------------------------------------
# Host RAM of a server's processes besides its buffers (API server + engine core: Python, torch, CUDA
# libraries). Not measured cleanly (RSS sums count shared pages twice); a round figure.
HOST_BASE = 3 * GIB
RAM_RESERVE = 8 * GIB  # left to the desktop and mm when offload = "fit" sizes the KV offload
# RAM a KV offload takes per byte of its size: vLLM 0.26's native offload of 32 GiB left perf holding
# 69-71 GiB (PSS) asleep where baseline, the same model without it, held 15.0 (rotation12_h100.txt).
OFFLOAD_RAM_COST = 1.75
# The most offload = "fit" sizes: pinned RAM is the OS's no more until the server stops, pinning it
# takes each start 0.7 s a GiB (card12_h100_run1), and a sleeping perf keeps it: with 32 GiB, perf
# alone held 70 GiB and the six shipped profiles could not sleep together in 128 GiB (rotation12_h100).
# 8 GiB holds 300,000 tokens of the 7B's fp8 KV cache, twice what its GPU holds on a 12 GiB card.
OFFLOAD_FIT_MAX = 8 * GIB
FIT_REQUESTS = 8  # context = "fit": the longest context at which this many full requests fit the KV cache
DEFAULT_SEQUENCES = 16
NO_SHAPES = "no model shapes on this machine"


@dataclass
class Footprint:
    """What the scheduler budgets a server with: bytes on the card awake and asleep; `measured` once it
    ran (serve.scheduler), else predicted (Prediction.footprint)."""
    awake: int
    asleep: int
    measured: bool = False


@dataclass(frozen=True)
class Prediction:
    """What one server holds on this card: awake (by part), asleep, and in host RAM."""
    profile: str
    card: Card | None
    form: str  # "bytes" ([memory]), "share" (gpu_memory_utilization), "unknown" (no shapes on disk)
    # awake, bytes: weights (with vLLM's per-token buffers), kv_cache, cuda_graphs, activations (a full
    # batch), cuda_context (with cuBLAS and other workspaces vLLM calls non-torch)
    parts: Mapping[str, int]
    asleep_bytes: int
    host_ram_bytes: int
    sizes: Sizes = field(default_factory=Sizes)  # what server_argv passes for this card
    context: int | None = None
    sequences: int | None = None
    kv_tokens: int | None = None
    kv_per_token: int = 0
    kv_dtype: str = ""
    context_limit: int | None = None  # the model's own
    extra_tokens: int = 0  # KV a request holds besides its context (an encoder's cross-attention)
    kept_activations: int = 0  # of "activations": what stays allocated at rest, after warm-up
    starts: bool = True  # False: vLLM would refuse (no room for KV, or less than one request)
    advice: tuple[tuple[str, str], ...] = ()  # (key, value) that would fit, most direct first
    notes: tuple[str, ...] = ()
    weights_from: str = ""
    kept_for_sleepers: int = 0  # what "fill" left beside it for sleepers' residues (Sleepers.kept_by_fill)

    @property
    def awake_bytes(self) -> int:
        """The most the server holds awake: after warm-up, plus a full batch's activations."""
        return sum(self.parts.values())

    @property
    def footprint(self) -> Footprint:
        return Footprint(awake=self.awake_bytes, asleep=self.asleep_bytes)

    @property
    def steady_bytes(self) -> int:
        """What NVML shows at rest or under short requests (no full prefill batch in flight)."""
        return self.awake_bytes - self.parts.get("activations", 0) + self.kept_activations

    @property
    def spare(self) -> int | None:
        return self.card.capacity - self.awake_bytes if self.card else None

    @property
    def full_requests(self) -> float | None:
        """How many requests of the full context the KV cache holds at once."""
        per = (self.context or 0) + self.extra_tokens
        return self.kv_tokens / per if self.kv_tokens is not None and per else None

    def kv_text(self) -> str:
        if not self.kv_tokens:
            return ""
        full = self.full_requests
        return f"{self.kv_tokens:,} tokens, {self.kv_dtype}" + (
            f", {full:.1f} requests of {self.context:,}" if full is not None else "")

    def summary(self, where: bool = True) -> str:
        """One line: the parts, asleep, RAM (`where`: and the card)."""
        names = {"weights": "weights", "kv_cache": "KV", "cuda_graphs": "CUDA graphs",
                 "activations": "activations", "cuda_context": "CUDA context", "vllm_share": "vLLM's share",
                 "workspace": "attention workspace", "all_reduce": "all-reduce buffers"}
        parts = " + ".join(f"{names.get(k, k)} {v / GIB:.2f}" + (f" ({self.kv_text()})" if k == "kv_cache"
                                                                 and self.kv_tokens else "")
                           for k, v in self.parts.items())
        on = f" on {self.card.label()}" if self.card and where else ""
        asleep = f"asleep {gib(self.asleep_bytes)}" if self.asleep_bytes else "stopped, not slept"
        return f"{gib(self.awake_bytes)} awake{on} = {parts}; {asleep}; RAM {gib(self.host_ram_bytes)}"


# --- room for sleepers ---------------------------------------------------------------------------------
# "fill" leaves room beside it for the SLEEPERS_KEPT largest residues of the other servers that may
# sleep: the scheduler stops the least recently used sleeper first, so the two used last stay asleep
# whichever they are, and a rotation through three profiles switches by sleep and wake. It keeps at
# most SLEEPERS_SHARE of what the KV cache would take, so the profile stays what it was made for: on a
# 12 GiB card perf's 7B keeps 8 requests of 8192 tokens (16384 with the whole rest).
SLEEPERS_KEPT = 2
SLEEPERS_SHARE = 0.5


@dataclass(frozen=True)
class Sleepers:
    """The servers that may sleep beside a profile, (profile, bytes it keeps on the card asleep) each,
    and whether the CUDA driver's process checkpoint takes those bytes off the card."""
    residues: tuple[tuple[str, int], ...] = ()
    checkpointed: bool = False
    why: str = ""  # why the driver can or cannot checkpoint (cuda_checkpoint.Support.why)

    def without(self, *names: str) -> Sleepers:
        return replace(self, residues=tuple((n, b) for n, b in self.residues if n not in names))

    def on_card(self) -> list[int]:
        """What each keeps on the card asleep, largest first: nothing where it is checkpointed."""
        return sorted((0 if self.checkpointed else b for _, b in self.residues), reverse=True)

    def kept_by_fill(self, room: int, floor: int) -> int:
        """Bytes "fill" leaves for them out of `room` (what its KV cache would otherwise take),
        leaving the KV cache at least `floor` (one request)."""
        want = sum(self.on_card()[:SLEEPERS_KEPT])
        return max(0, min(want, int(SLEEPERS_SHARE * room), room - floor))

    def fitting(self, spare: int) -> tuple[int, int]:
        """(any, most): how many of them fit in `spare` bytes whichever they are (the largest
        counted first), and at most (the smallest first)."""
        sizes = self.on_card()
        return _count_within(sizes, spare), _count_within(sizes[::-1], spare)


def _count_within(sizes: list[int], limit: int) -> int:
    total = n = 0
    for size in sizes:
        total += size
        if total > limit:
            break
        n += 1
    return n


def graph_bytes(shape: Shape, capture: int) -> int:
    if capture <= 0:
        return 0
    return GRAPH_FIXED + capture * max(1, shape.layers // 2) * (_mlp_width(shape) + 4 * shape.hidden) * 2


def compile_reserve_bytes(shape: Shape, batched: int, eager: bool) -> int:
    """What torch.compile's first runs leave reserved at the KV cache's allocation: only the decoder
    is compiled (none when eager)."""
    return 0 if eager else COMPILE_RESERVE * decoder_activation_bytes(shape, batched)


def context_bytes(eager: bool) -> int:
    """The CUDA context with cuBLAS's and vLLM's non-torch workspaces, and torch.compile's kernels."""
    return NON_TORCH + CUDA_CONTEXT + (0 if eager else COMPILED_KERNELS)


def all_reduce_bytes(profile: Profile) -> int:
    """The all-reduce buffers each card of a tensor-parallel server keeps (none on one card)."""
    return ALL_REDUCE if profile.tensor_parallel > 1 else 0


def workspace_bytes(profile: Profile) -> int:
    """Attention backends' buffers outside the KV cache and the profiled activations."""
    backend = str(profile.engine.get("attention_backend") or "").upper()
    return FLASHINFER_WORKSPACE if backend.startswith("FLASHINFER") else 0


def decode_step_bytes(shape: Shape, sequences: int, batched: int) -> int:
    """One decode step of every sequence, and the fixed part (logits and such)."""
    return 2 * min(sequences, batched) * (_mlp_width(shape) + 2 * shape.hidden) + ACTIVATION_FIXED


def sampler_bytes(shape: Shape, sequences: int) -> int:
    """The sampler's buffers for every sequence (vLLM preallocates them at their largest)."""
    return sequences * shape.vocab * SAMPLER_BYTES


def kept_activation_bytes(shape: Shape, sequences: int, batched: int) -> int:
    """What the warm-up leaves allocated: one decode step of every sequence or the sampler's
    buffers for them, whichever is larger (they are never freed)."""
    return int(max(decode_step_bytes(shape, sequences, batched), sampler_bytes(shape, sequences)))


def compiled_activation_bytes(shape: Shape, sequences: int, batched: int) -> int:
    """A compiled server's peak beyond weights, KV cache, graphs and context: the decode step on top
    of what torch.compile left reserved, or of the sampler's buffers where those are larger (the
    warm-up allocates them from the reserved blocks)."""
    # the larger, not the sum: the sum had baseline 0.71 GiB high (benchmark_results/card12_h200x2_run2.txt)
    return max(activation_bytes(shape, batched),
               decode_step_bytes(shape, sequences, batched)
               + max(sampler_bytes(shape, sequences), compile_reserve_bytes(shape, batched, False)))


def default_sequences(capacity: int) -> int:
    """vLLM's default max_num_seqs for `vllm serve`: 1024 on cards of 70 GiB and more, else 256."""
    return 1024 if capacity >= 70 * GIB else 256


@dataclass(frozen=True)
class _Model:
    """The shapes predict needs, resolved once."""
    shape: Shape
    weights: int
    weights_from: str
    kv_per_token: int
    kv_dtype: str
    limit: int | None


def _model(profile: Profile, cfg: Mapping[str, Any] | None, folder: Path | None) -> _Model | None:
    shape = Shape.from_config(cfg) if cfg else None
    if shape is None:
        return None
    engine = profile.engine
    shape = shape.served_as(engine.get("quantization"))
    dtype = str(engine.get("dtype", "auto")).lower()
    kv_name, kv_size = kv_bytes(engine.get("kv_cache_dtype"), shape.dtype if dtype in ("auto", "") else dtype)
    weights, source = weights_of(shape, engine, folder)
    cards = profile.tensor_parallel  # each card holds its part: the prediction is per card
    if cards > 1:
        shape, weights = shape.split(cards), -(-weights // cards)
    return _Model(shape, weights, source, shape.kv_bytes_per_token(kv_size), kv_name, context_limit(cfg))


def _batched(profile: Profile, shape: Shape | None, capacity: int, sequences: int) -> int:
    """max_num_batched_tokens: the profile's, else vLLM's default for a card of mm's capacity (so an
    emulated 12 GiB card on an 80 GB one batches like a real one), at least one whole image or audio
    clip (vLLM does not split them) and one token per sequence."""
    given = engine_int(profile.engine.get("max_num_batched_tokens"))
    if given:
        return given
    item = shape.mm_item_tokens if shape else 0
    need = max(default_batched_tokens(capacity), sequences, item)
    return need if need == default_batched_tokens(capacity) else 1 << (need - 1).bit_length()


def _capture(profile: Profile, sequences: int, batched: int, default: int) -> int:
    if profile.engine.get("enforce_eager") is True:
        return 0
    given = engine_int(profile.engine.get("max_cudagraph_capture_size"))
    return min(given or default, batched)


def _fit_context(kv_tokens: int, extra: int, limit: int | None) -> int:
    """context = "fit": the longest power of two (or the model's own limit) at which FIT_REQUESTS
    full requests fit in kv_tokens; failing that, the longest one request can have."""
    top = limit or 1 << 20
    candidates = sorted({top, *(1 << n for n in range(10, 21) if 1 << n < top)}, reverse=True)
    for want in (FIT_REQUESTS, 1):
        for c in candidates:
            if want * (c + extra) <= kv_tokens:
                return c
    return max(KV_BLOCK, (kv_tokens - extra) // KV_BLOCK * KV_BLOCK)


def _round_tokens(n: int) -> int:
    return -(-n // KV_BLOCK) * KV_BLOCK


def predict(profile: Profile, card: Card | None, cfg: Mapping[str, Any] | None = None,
            folder: Path | None = None, spec: ArgSpec | None = None, sleepers: Sleepers | None = None) -> Prediction:
    """The footprint of `profile`'s server on `card` (None: no GPU; only the [memory] basics are
    derived), from the model's config.json (`cfg`) and checkpoint folder. `spec` is the installed
    vLLM's parser (vllm_args.load_spec): flags it lacks are left out, with a note. `sleepers`: the
    others that may sleep beside it, for whom a KV cache sized to fill the card leaves room.
    Deterministic: the same inputs always give the same bytes."""
    model = _model(profile, cfg, folder)
    if profile.memory is not None:
        return _predict_bytes(profile, card, model, spec, sleepers or Sleepers())
    return _predict_share(profile, card, model)


def _share(profile: Profile, default: float | None) -> float | None:
    """engine.gpu_memory_utilization where it is a share (rules.py reports any other value)."""
    v = profile.engine.get("gpu_memory_utilization")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 else default


def _kv_size(m: Any, context: int | None, sequences: int, extra: int, per_token: int, room: int | None,
             notes: list[str]) -> int:
    """The KV cache in bytes: tokens asked for, bytes asked for, what the card has left (`room`), or
    sequences x context."""
    if m.kv_tokens:
        return _round_tokens(m.kv_tokens) * per_token
    if m.kv_cache:
        return m.kv_cache
    if m.kv_fill or context is None:
        if room is None:
            notes.append('kv_cache = "fill" needs a card: pass --gpu-memory')
        return max(0, room or 0)
    return _round_tokens(sequences * (context + extra)) * per_token


def offload_ram(offload: int) -> int:
    """RAM a KV offload of `offload` bytes takes (OFFLOAD_RAM_COST, measured)."""
    return int(offload * OFFLOAD_RAM_COST)


def _host_ram(profile: Profile, weights: int, offload: int) -> int:
    """`weights`: one card's (a tensor-parallel server's level-1 sleep keeps every card's in RAM)."""
    level1 = profile.sleep.enabled and profile.sleep.level == 1
    return HOST_BASE + offload_ram(offload) + (weights * profile.tensor_parallel if level1 else 0)


def engine_offload_bytes(profile: Profile) -> int:
    """engine.kv_offloading_size (GiB) in bytes; 0 where unset."""
    size = profile.engine.get("kv_offloading_size")
    try:
        return int(float(size) * GIB) if size is not None and not isinstance(size, bool) else 0
    except (TypeError, ValueError):
        return 0


def _predict_share(profile: Profile, card: Card | None, model: _Model | None) -> Prediction:
    """gpu_memory_utilization: vLLM fills that share of the card with KV after weights and its
    profiled activations; the CUDA context and graphs beyond its estimate lie outside the share."""
    share = _share(profile, DEFAULT_SHARE)
    capacity = card.capacity if card else 0
    sequences = engine_int(profile.engine.get("max_num_seqs")) or default_sequences(capacity or 80 * GIB)
    sizes = Sizes()
    notes: list[str] = []
    offload = engine_offload_bytes(profile)
    if card and card.budgeted:
        sizes = replace(sizes, share=card.utilization(share),
                        sequences=None if "max_num_seqs" in profile.engine else sequences)
    if model is None:
        parts = {"vllm_share": int(share * capacity), "cuda_context": CUDA_CONTEXT} if card else {}
        return Prediction(profile.name, card, "unknown", parts, ASLEEP_BASE if profile.sleep.enabled else 0,
                         _host_ram(profile, 0, offload), sizes, notes=(NO_SHAPES,))
    shape = model.shape
    batched = _batched(profile, shape, capacity or 80 * GIB, sequences)
    if card and card.budgeted and "max_num_batched_tokens" not in profile.engine:
        sizes = replace(sizes, batched_tokens=batched)
    capture = _capture(profile, sequences, batched, min(2 * sequences, 512))
    graphs = graph_bytes(shape, capture)
    buffers = BUFFER_BYTES_PER_HIDDEN * shape.hidden
    peak = activation_bytes(shape, batched)
    vllm_graphs = CUDA_GRAPHS if capture else 0
    all_reduce = all_reduce_bytes(profile)  # outside torch: vLLM's profiler takes it off the KV cache
    kv = int(share * capacity) - model.weights - buffers - peak - NON_TORCH - vllm_graphs - all_reduce
    limit = engine_int(profile.engine.get("max_model_len"))
    context = limit if limit and limit > 0 else model.limit
    tokens = max(0, kv) // model.kv_per_token // KV_BLOCK * KV_BLOCK if card else None
    starts = card is None or (kv > 0 and (context is None or tokens >= context + shape.encoder_positions))
    # torch.compile's first runs happen inside vLLM's profiling (their peak is in its share), but what
    # they leave reserved stays beside the KV cache, outside the share (the shapes at 0.85 of
    # 12 GiB died at warm-up, 11.9 GiB in use)
    eager = profile.engine.get("enforce_eager") is True
    parts = {"weights": model.weights + buffers, "kv_cache": max(0, kv) if card else 0, "cuda_graphs": graphs,
             "activations": peak + compile_reserve_bytes(shape, batched, eager), "cuda_context": context_bytes(eager)}
    if all_reduce:
        parts["all_reduce"] = all_reduce
    fp = Prediction(profile.name, card, "share", parts, (ASLEEP_BASE + graphs) if profile.sleep.enabled else 0,
                   _host_ram(profile, model.weights, offload), sizes, context=context, sequences=sequences,
                   kv_tokens=tokens, kv_per_token=model.kv_per_token, kv_dtype=model.kv_dtype,
                   context_limit=model.limit, extra_tokens=shape.encoder_positions,
                   kept_activations=kept_activation_bytes(shape, sequences, batched),
                   starts=starts, notes=tuple(notes), weights_from=model.weights_from)
    return replace(fp, advice=advise(fp, model, share, None))


def _predict_bytes(profile: Profile, card: Card | None, model: _Model | None, spec: ArgSpec | None,
                   sleepers: Sleepers) -> Prediction:
    """[memory]: exact KV bytes from tokens and the model's shapes, the rest predicted around them."""
    m = profile.memory
    assert m is not None
    sequences = m.sequences or DEFAULT_SEQUENCES
    sizes = Sizes(sequences=sequences, context=m.context)
    notes: list[str] = []
    capacity = card.capacity if card else 0
    if model is None:
        share = _share(profile, DEFAULT_SHARE)
        if card:
            sizes = replace(sizes, share=card.utilization(share))
        notes.append(f"{NO_SHAPES}: vLLM sizes the KV cache from a share of the card until the model is "
                     "on disk")
        parts = {"vllm_share": int(share * capacity), "cuda_context": CUDA_CONTEXT} if card else {}
        return Prediction(profile.name, card, "unknown", parts, ASLEEP_BASE if profile.sleep.enabled else 0,
                         _host_ram(profile, 0, 0), sizes, context=m.context, sequences=sequences,
                         notes=tuple(notes))
    shape = model.shape
    batched = _batched(profile, shape, capacity or 80 * GIB, sequences)
    capture = _capture(profile, sequences, batched, sequences) if card else 0
    graphs = graph_bytes(shape, capture)
    weights = model.weights + BUFFER_BYTES_PER_HIDDEN * shape.hidden
    kept = kept_activation_bytes(shape, sequences, batched)
    eager = profile.engine.get("enforce_eager") is True
    activations = kept if eager else compiled_activation_bytes(shape, sequences, batched)
    workspace = workspace_bytes(profile)
    all_reduce = all_reduce_bytes(profile)
    fixed = weights + graphs + activations + workspace + all_reduce + context_bytes(eager)
    per_token, extra = model.kv_per_token, shape.encoder_positions
    context = m.context
    if context and model.limit and context > model.limit and profile.model_replaced:
        notes.append(f"context {context:,} is longer than {profile.model} allows: {model.limit:,}")
        context = model.limit
    room = capacity - HEADROOM - fixed if card else None
    for_sleepers = _kept_for_sleepers(m, context, room, (context or MIN_FIT_CONTEXT) + extra, per_token, sleepers,
                                      notes)
    kv = _kv_size(m, context, sequences, extra, per_token, room - for_sleepers if room is not None else None, notes)
    tokens = kv // per_token // KV_BLOCK * KV_BLOCK
    if context is None and tokens:
        context = _fit_context(tokens, extra, model.limit)
    offload = _offload(profile, card, model.weights, notes)
    sizes = replace(sizes, kv_cache_bytes=int(kv) if tokens else None, context=context or None,
                    batched_tokens=batched if card else None, capture_size=capture if card and capture else None,
                    offload_bytes=offload)
    parts = {"weights": weights, "kv_cache": int(kv), "cuda_graphs": graphs, "activations": activations,
             "cuda_context": context_bytes(eager)}
    if workspace:
        parts["workspace"] = workspace
    if all_reduce:
        parts["all_reduce"] = all_reduce
    awake = sum(parts.values())
    if card:
        cap = _share(profile, None)
        # vLLM 0.26 still checks utilization x total against free memory at start: ask for what the
        # server holds at rest (its CUDA context exists by then; the compile reserve comes and goes
        # later), never more than the profile's own cap. (The cap itself asked voice-stt for 3.63 GiB
        # free where it peaks at 3.0, and beside a sleeper's residue it would not start: card12 run2.)
        rest = awake - activations + kept - CUDA_CONTEXT
        sizes = replace(sizes, share=card.utilization(min(rest / card.capacity, cap if cap is not None else 1.0)))
        sizes = _fall_back(sizes, spec, card, weights, activation_bytes(shape, batched), kv, capture, notes)
    fp = Prediction(profile.name, card, "bytes", parts, (ASLEEP_BASE + graphs) if profile.sleep.enabled else 0,
                   _host_ram(profile, model.weights, offload or engine_offload_bytes(profile)), sizes,
                   context=context, sequences=sequences, kv_tokens=tokens, kv_per_token=per_token,
                   kv_dtype=model.kv_dtype, context_limit=model.limit, extra_tokens=extra, kept_activations=kept,
                   starts=card is None and not tokens or 0 < tokens >= (context or 0) + extra, notes=tuple(notes),
                   weights_from=model.weights_from, kept_for_sleepers=for_sleepers)
    return replace(fp, advice=advise(fp, model, None, m))


def fills_card(m: Any, context: int | None) -> bool:
    """Whether the KV cache takes what the card has left (kv_cache = "fill", or no size and context "fit")."""
    return not m.kv_tokens and not m.kv_cache and (m.kv_fill or context is None)


def _kept_for_sleepers(m: Any, context: int | None, room: int | None, floor_tokens: int, per_token: int,
                       sleepers: Sleepers, notes: list[str]) -> int:
    """Bytes a KV cache that fills the card leaves for the sleepers beside it, with a note saying so."""
    if room is None or not fills_card(m, context) or not sleepers.residues:
        return 0
    kept = sleepers.kept_by_fill(room, _round_tokens(floor_tokens) * per_token)
    want, others = sum(sleepers.on_card()[:SLEEPERS_KEPT]), len(sleepers.residues)
    if sleepers.checkpointed:
        notes.append('kv_cache = "fill" keeps nothing for sleepers: the CUDA driver checkpoints them off the card')
    elif kept == want:
        notes.append(f'kv_cache = "fill" leaves {gib(kept)} for the {min(SLEEPERS_KEPT, others)} largest of the '
                     f"{others} servers that may sleep beside it")
    else:
        notes.append(f'kv_cache = "fill" leaves {gib(kept)} for sleepers beside it, at most {SLEEPERS_SHARE:.0%} of '
                     f"its room (the {SLEEPERS_KEPT} largest of the {others} that may sleep keep {gib(want)})")
    return kept


def _fall_back(sizes: Sizes, spec: ArgSpec | None, card: Card, weights: int, profiled: int,
               kv: int, capture: int, notes: list[str]) -> Sizes:
    """Flags the installed vLLM lacks: leave them out and say what happens instead."""
    version = f"vLLM {spec.version}" if spec else "vLLM"
    if sizes.kv_cache_bytes is not None and not accepts(spec, "kv_cache_bytes"):
        # vLLM then sizes KV as share x total - weights - profiled activations - non-torch - its graph estimate
        need = weights + profiled + NON_TORCH + (CUDA_GRAPHS if capture else 0) + kv
        sizes = replace(sizes, kv_cache_bytes=None, share=min(1.0, math.ceil(need / card.total * 1000) / 1000))
        notes.append(f"{version} has no {size_flag('kv_cache_bytes')}: mm passes gpu_memory_utilization "
                     f"{sizes.share:g} so that its own sizing gives about the same KV cache")
    if sizes.capture_size is not None and not accepts(spec, "capture_size"):
        sizes = replace(sizes, capture_size=None)
        notes.append(f"{version} has no {size_flag('capture_size')}: it captures graphs up to twice the "
                     "sequences (more GPU memory than predicted)")
    return sizes


def _offload(profile: Profile, card: Card | None, weights: int, notes: list[str]) -> int:
    """Bytes of RAM for offloaded KV blocks: memory.offload, or for "fit" the size whose RAM
    (OFFLOAD_RAM_COST) is half of what this machine spares after the desktop, this server's processes
    and (level 1 sleep) its weights, at most OFFLOAD_FIT_MAX: the other half is where sleepers sit."""
    m = profile.memory
    if m is None or not (m.offload or m.offload_fit):
        return 0
    if m.offload:
        return m.offload
    ram = card.host_ram if card else None
    if not ram:
        notes.append('offload = "fit" needs the machine\'s RAM, which is unknown: no KV offload')
        return 0
    spare = int((ram - RAM_RESERVE - _host_ram(profile, weights, 0)) / 2 / OFFLOAD_RAM_COST)
    if spare < GIB:
        notes.append(f"offload = \"fit\": {gib(ram)} of RAM leaves nothing to offload KV blocks to")
        return 0
    return min(spare, OFFLOAD_FIT_MAX) // GIB * GIB
