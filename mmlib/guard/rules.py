"""Known bad combinations, as data: each rule says when it applies, what goes wrong, and the fix.

Adding a rule is one entry in RULES. A rule sees the profile and the Facts of this machine (GPU,
vLLM build, ports, the model's config.json); tests build Facts by hand to fake a Hopper GPU or a
CPU-only box. Nothing here imports vLLM or touches the GPU: checks.py gathers the facts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mmlib.guard.modelinfo import Shape, model_max_len
from mmlib.profiles.profile import Profile
from mmlib.profiles.vllm_cmd import SLEEP_MODE, engine_int, wants_tcp
from mmlib.system.nvml import GpuInfo

ERROR, WARN, INFO = "error", "warn", "info"
SEVERITIES = (ERROR, WARN, INFO)


@dataclass(frozen=True)
class Finding:
    severity: str
    file: str
    key: str
    message: str
    fix: str = ""
    rule: str = ""

    def line(self) -> str:
        where = f"{self.file}: {self.key}: " if self.key else f"{self.file}: "
        return where + self.message + (f" (fix: {self.fix})" if self.fix else "")


@dataclass(frozen=True)
class Facts:
    """The machine a profile is checked against. Every field has a harmless default."""
    gpus: tuple[GpuInfo, ...] | None = None  # None: no NVIDIA GPU answered
    is_cpu: bool = False  # vLLM's CPU build is installed
    port_in_use: Callable[[str, int], bool] = lambda host, port: False
    model_config: Mapping[str, Any] | None = None  # the profile's model config.json, where found
    vllm_env: frozenset[str] | None = None  # every VLLM_* name the installed vLLM reads, where known
    environ: Mapping[str, str] = field(default_factory=dict)  # the shell's environment (servers inherit it)
    ram_total: int | None = None  # this machine's RAM, bytes (None: unknown)
    ram_available: int | None = None
    # the processes of the servers mm runs: what they hold on the GPU is room mm makes itself
    mm_pids: frozenset[int] = frozenset()

    @property
    def gpu(self) -> GpuInfo | None:
        return self.gpus[0] if self.gpus else None


Text = str | Callable[[Profile, Facts], str]


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    applies: Callable[[Profile, Facts], bool]
    message: Text
    fix: Text
    key: Text = ""

    def finding(self, p: Profile, facts: Facts) -> Finding:
        def text(t: Text) -> str:
            return t(p, facts) if callable(t) else t
        return Finding(self.severity, p.source, text(self.key), text(self.message), text(self.fix), self.id)


# --- what rules ask of a profile --------------------------------------------------------------------
def _get(p: Profile, key: str, default: Any = None) -> Any:
    return p.engine.get(key, default)


def _lower(value: Any) -> str:
    return str(value).lower() if value is not None else ""


def kv_offloading(p: Profile) -> bool:
    return ("kv_offloading_size" in p.engine or "kv_offloading_backend" in p.engine
            or bool(p.memory and (p.memory.offload or p.memory.offload_fit)))


def fp8_kv(p: Profile) -> bool:
    return _lower(_get(p, "kv_cache_dtype", "auto")).startswith("fp8")


def quant_method(p: Profile, facts: Facts) -> str:
    """"awq", "gptq", ... from engine.quantization, else the model's config.json, else its name."""
    q = _lower(_get(p, "quantization"))
    if q:
        return q
    cfg = facts.model_config or {}
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config") or {}
    if qc.get("quant_method"):
        return _lower(qc["quant_method"])
    if cfg:
        return ""
    return "awq" if "awq" in _lower(p.model) else ""


def served_dtype(p: Profile, facts: Facts) -> str:
    """The activation dtype vLLM will use: engine.dtype, else the checkpoint's (AWQ ones are fp16)."""
    d = _lower(_get(p, "dtype", "auto"))
    if d in ("half", "float16"):
        return "float16"
    if d not in ("", "auto"):
        return "bfloat16" if d == "bfloat16" else d
    cfg = facts.model_config or {}
    stored = _lower(cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("torch_dtype"))
    if stored:
        return stored
    return "float16" if quant_method(p, facts).startswith("awq") else "bfloat16"


def uses_fa3(p: Profile, facts: Facts) -> bool:
    """vLLM picks FlashAttention (version 3 on Hopper) unless another backend is named."""
    backend = _lower(_get(p, "attention_backend", "auto"))
    return bool(facts.gpu and facts.gpu.is_hopper) and backend in ("auto", "", "flash_attn")


def _too_long(p: Profile, facts: Facts, wanted: int | None = None) -> bool:
    limit, wanted = model_max_len(facts.model_config), wanted or engine_int(_get(p, "max_model_len"))
    allowed = (facts.model_config or {}).get("model_max_length")
    env = {**facts.environ, **p.env}
    return (limit is not None and wanted is not None and wanted > limit
            and not (isinstance(allowed, int) and wanted <= allowed)
            and env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0") in ("", "0"))


def _share_out_of_range(p: Profile, facts: Facts) -> bool:
    v = _get(p, "gpu_memory_utilization")
    return v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def local_model(p: Profile) -> Path | None:
    """The folder of a model given as a path (the embedded one once converted); None for hub ids."""
    from mmlib.profiles.vllm_cmd import resolve_model

    if not p.model or not (p.model.startswith(("/", ".", "~")) or p.model.startswith("embedded:")):
        return None
    return Path(resolve_model(p.model)).expanduser()


def _path_missing(p: Profile, facts: Facts) -> bool:
    folder = local_model(p)
    return folder is not None and not p.model.startswith("embedded:") and not folder.exists()


def _weights_missing(p: Profile, facts: Facts) -> bool:
    folder = local_model(p)
    if folder is None or not folder.is_dir() or _lower(_get(p, "load_format")) == "dummy":
        return False
    return not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES)


# --- more than one card ----------------------------------------------------------------------------------
def _cards_text(f: Facts) -> str:
    if not f.gpus:
        return "this machine has no GPU" + (" (vLLM's CPU build)" if f.is_cpu else "")
    return f"this machine has {len(f.gpus)}: " + ", ".join(f"{g.index} ({g.name})" for g in f.gpus)


def _missing_cards(p: Profile, f: Facts) -> list[int]:
    here = {g.index for g in f.gpus or ()}
    return [i for i in p.gpu_indices if i not in here]


def _too_few_cards(p: Profile, f: Facts) -> bool:
    return not p.gpu_indices and p.gpus > 1 and p.gpus > len(f.gpus or ())


def _model_shape(f: Facts) -> Shape | None:
    return Shape.from_config(f.model_config) if f.model_config else None


def _unsplittable(p: Profile, f: Facts) -> bool:
    shape = _model_shape(f)
    return p.tensor_parallel > 1 and shape is not None and not shape.splits_over(p.tensor_parallel)


def _split_fix(p: Profile, f: Facts) -> str:
    shape = _model_shape(f)
    sizes = [n for n in range(2, max(8, p.gpus) + 1) if shape and shape.splits_over(n)]
    if not sizes:
        return 'set parallel = "data", or gpus = 1'
    return f"set gpus = {' or '.join(map(str, sizes[:3]))} (numbers of cards its heads divide by)"


# --- environment variables vLLM no longer reads ------------------------------------------------------
@dataclass(frozen=True)
class RemovedEnv:
    name: str
    severity: str
    why: str
    fix: str  # "{value}" is replaced by the variable's value


REMOVED_ENV = (
    RemovedEnv("VLLM_ATTENTION_BACKEND", ERROR,
               "vLLM no longer reads it, so the backend named here would silently not be used",
               'set engine.attention_backend = "{value}" and remove the variable'),
    RemovedEnv("VLLM_USE_V1", WARN, "vLLM no longer reads it: V1 is its only engine", "remove the variable"),
)


def _env_value(p: Profile, facts: Facts, name: str) -> tuple[str, str] | None:
    """(where, value) of a variable the server would get: the profile's [env], else the shell's."""
    if name in p.env:
        return f"env.{name}", p.env[name]
    if name in facts.environ:
        return f"{name} (from your shell)", facts.environ[name]
    return None


def _env_rule(r: RemovedEnv) -> Rule:
    def applies(p: Profile, facts: Facts) -> bool:
        still_read = facts.vllm_env is not None and r.name in facts.vllm_env
        return _env_value(p, facts, r.name) is not None and not still_read

    return Rule(f"env-{r.name.lower().replace('_', '-')}", r.severity, applies, r.why,
                lambda p, f: r.fix.format(value=(_env_value(p, f, r.name) or ("", "..."))[1]),
                key=lambda p, f: (_env_value(p, f, r.name) or (r.name, ""))[0])


# --- the table ---------------------------------------------------------------------------------------
RULES: list[Rule] = [
    Rule("kv-offload-hybrid", ERROR,
         lambda p, f: kv_offloading(p) and _get(p, "disable_hybrid_kv_cache_manager") is False,
         "KV offloading needs the hybrid KV cache manager off; vLLM refuses to start with it forced on",
         "set engine.disable_hybrid_kv_cache_manager = true", key="engine.disable_hybrid_kv_cache_manager"),
    Rule("kv-offload-hybrid-unset", WARN,
         lambda p, f: kv_offloading(p) and "disable_hybrid_kv_cache_manager" not in p.engine,
         "KV offloading needs the hybrid KV cache manager off; left unset, older vLLM releases fail to start",
         "add engine.disable_hybrid_kv_cache_manager = true", key="engine.kv_offloading_size"),
    Rule("kv-offload-no-size", WARN,
         lambda p, f: ("kv_offloading_backend" in p.engine and "kv_offloading_size" not in p.engine
                       and not (p.memory and (p.memory.offload or p.memory.offload_fit))),
         "does nothing by itself: vLLM offloads KV blocks only when kv_offloading_size is set",
         "add engine.kv_offloading_size = <GiB of RAM for KV blocks>", key="engine.kv_offloading_backend"),
    Rule("awq-fp16-fp8kv-fa3", ERROR,
         lambda p, f: (uses_fa3(p, f) and fp8_kv(p) and quant_method(p, f).startswith("awq")
                       and served_dtype(p, f) == "float16"),
         lambda p, f: (f"an fp16 AWQ model with an fp8 KV cache dies at warm-up on {f.gpu.name if f.gpu else 'Hopper'} "
                       "(FlashAttention 3: \"For FP8 input, output must have dtype BF16\")"),
         'set engine.dtype = "bfloat16"', key="engine.kv_cache_dtype"),
    Rule("sleep-mode-on-cpu", ERROR,
         lambda p, f: f.is_cpu and _get(p, "enable_sleep_mode") is True,
         "vLLM's CPU build has no sleep mode; the server would fail at start",
         "remove engine.enable_sleep_mode ([sleep] enabled = true lets mm use sleep mode where it exists)",
         key="engine.enable_sleep_mode"),
    Rule("sleep-mode-in-engine", WARN,
         lambda p, f: not f.is_cpu and _get(p, "enable_sleep_mode") is True,
         f"mm adds {SLEEP_MODE} itself when [sleep] is on, and only then can it sleep the server",
         "remove engine.enable_sleep_mode and set [sleep] enabled = true", key="engine.enable_sleep_mode"),
    Rule("sleep-falls-back-on-cpu", INFO,
         lambda p, f: f.is_cpu and p.sleep.enabled,
         "vLLM's CPU build has no sleep mode: switching stops and starts this server instead",
         "", key="sleep"),
    Rule("port-in-use", ERROR,
         lambda p, f: p.port is not None and f.port_in_use(p.host, p.port),
         lambda p, f: f"port {p.port} is already in use on {p.host}",
         "stop what holds it, or remove `port` to let mm pick a free one", key="port"),
    Rule("max-model-len-over-model", ERROR, _too_long,
         lambda p, f: (f"{_get(p, 'max_model_len')} is longer than the model allows "
                       f"({model_max_len(f.model_config)} tokens in its config.json); vLLM refuses to start"),
         lambda p, f: f"set engine.max_model_len = {model_max_len(f.model_config)} or less",
         key="engine.max_model_len"),
    Rule("memory-context-over-model", ERROR,
         lambda p, f: bool(p.memory and p.memory.context and _too_long(p, f, p.memory.context)),
         lambda p, f: (f"{p.memory.context} is longer than the model allows "
                       f"({model_max_len(f.model_config)} tokens in its config.json); vLLM refuses to start"),
         lambda p, f: f'set memory.context = {model_max_len(f.model_config)} or less (or "fit")',
         key="memory.context"),
    Rule("model-path-missing", ERROR, _path_missing,
         lambda p, f: f"{p.model} does not exist", "point model at a folder with config.json, or use a hub id",
         key="model"),
    Rule("model-weights-missing", ERROR, _weights_missing,
         lambda p, f: f"{local_model(p)} has no weight files (*.safetensors, *.bin, *.gguf)",
         'copy the weights there, or set engine.load_format = "dummy" for random weights of the right size',
         key="model"),
    Rule("memory-share-range", ERROR, _share_out_of_range,
         lambda p, f: f"{_get(p, 'gpu_memory_utilization')!r} is not a share of the GPU's memory",
         "use a number above 0 and at most 1, e.g. 0.85", key="engine.gpu_memory_utilization"),
    # profile.py refuses sleep mode on anything but loopback; there, other users of this machine remain.
    Rule("sleep-endpoints-on-tcp", WARN, lambda p, f: not f.is_cpu and p.sleep.enabled and wants_tcp(p),
         lambda p, f: (f"sleep mode needs vLLM's dev endpoints: /sleep, /wake_up and /collective_rpc answer every "
                       f"user of this machine on {p.host}:{p.port or 'its port'} (its api_key guards /v1 only)"),
         "leave port and host out: mm then serves it on a unix socket only you can reach (clients use mm's proxy)",
         key=lambda p, f: "port" if p.port is not None else "host"),
    *(_env_rule(r) for r in REMOVED_ENV),
    Rule("gpus-too-few", ERROR, _too_few_cards,
         lambda p, f: f"needs {p.gpus} GPUs and {_cards_text(f)}",
         lambda p, f: (f"set gpus = {len(f.gpus)}, or run it where {p.gpus} GPUs are visible" if f.gpus and len(f.gpus) > 1
                       else "remove gpus and parallel (one card); a multi-card layout needs a machine with 2 or more GPUs"),
         key="gpus"),
    Rule("gpus-not-here", ERROR, lambda p, f: bool(_missing_cards(p, f)),
         lambda p, f: (("cards {} are" if len(_missing_cards(p, f)) > 1 else "card {} is").format(
                           ", ".join(map(str, _missing_cards(p, f)))) + " not among the GPUs mm sees: "
                       + _cards_text(f) + (" (CUDA_VISIBLE_DEVICES hides the others)"
                                           if "CUDA_VISIBLE_DEVICES" in f.environ else "")),
         "list cards as `mm status` numbers them", key="gpus"),
    Rule("tensor-split", ERROR, _unsplittable,
         lambda p, f: (f"the model's {_model_shape(f).heads} attention heads ({_model_shape(f).kv_heads} KV heads) "
                       f"do not split evenly over {p.gpus} cards: vLLM refuses to start"),
         _split_fix, key="gpus"),
]


def evaluate(p: Profile, facts: Facts, rules: list[Rule] | None = None) -> list[Finding]:
    return [r.finding(p, facts) for r in (RULES if rules is None else rules) if r.applies(p, facts)]


# --- engine arguments vLLM renamed or removed: what to write instead ---------------------------------
# Used only when the installed vLLM lacks the flag; its parser stays the judge of what exists.
RENAMED_ARGS: dict[str, str] = {
    "disable_log_requests": "remove it: request logging is off by default (enable_log_requests = true turns it on)",
    "swap_space": "remove it: the V1 engine has no CPU swap space (kv_offloading_size offloads KV blocks to RAM)",
    "task": 'use engine.runner = "pooling" (with convert = "embed" or "classify") for embedding models',
    "guided_decoding_backend": 'use engine.structured_outputs_config = { backend = "xgrammar" }',
    "num_scheduler_steps": "remove it (async_scheduling = true is the V1 engine's way)",
    "use_v2_block_manager": "remove it: it is the only block manager",
    "max_seq_len_to_capture": "use engine.max_cudagraph_capture_size",
    "disable_async_output_proc": "remove it",
    "preemption_mode": "remove it: the V1 engine always recomputes preempted requests",
    "tokenizer_pool_size": "remove it",
    "speculative_model": 'use engine.speculative_config = { model = "...", num_speculative_tokens = 3 }',
    "worker_use_ray": 'use engine.distributed_executor_backend = "ray"',
}
