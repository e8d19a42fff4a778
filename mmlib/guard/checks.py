"""Guard rails run before a server starts, and by `mm check`: a profile against the installed vLLM
(its own argument parser, asked once per version) and this machine (GPU, ports, memory fit).

Every problem is a Finding naming the profile file, the key and the fix; errors stop `mm up`
(`--force` skips the checks), warnings are printed and the start goes on.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Callable, Iterable

from mmlib.errors import MMError, ProfileError
from mmlib.guard import fit as fitmod
from mmlib.guard import layout, modelinfo, rules
from mmlib.guard.rules import ERROR, INFO, WARN, Facts, Finding
from mmlib.models import cache
from mmlib.profiles.profile import Profile, list_profile_names, load_all, load_profile, name_clashes
from mmlib.profiles.vllm_args import ArgAction, ArgSpec, SpecUnavailable, load_spec
from mmlib.profiles.vllm_cmd import (
    RESERVED_ENGINE_KEYS,
    checkpoint_blocker,
    derived_engine,
    engine_args,
    engine_int,
    flag,
    installed_vllm,
    layout_engine,
    resolve_model,
    server_argv,
)
from mmlib.system.nvml import GpuReport

# A fit estimate this close below max_model_len is a warning, not an error: the estimate is within
# a few percent of what vLLM prints, not exact.
FIT_MARGIN = 0.95


# --- the machine ---------------------------------------------------------------------------------
def port_checker(own_ports: frozenset[int] = frozenset()) -> Callable[[str, int], bool]:
    """Whether a port is taken by something other than mm's own servers (`own_ports`, which the
    caller asks the daemon for): `mm up` of a running profile must not trip on its own port."""
    from mmlib.system.net import port_taken

    return lambda host, port: port not in own_ports and port_taken(host, port)


def machine_facts(report: GpuReport | None = None, environ: dict[str, str] | None = None,
                  own_ports: frozenset[int] = frozenset(), mm_pids: frozenset[int] = frozenset()
                  ) -> tuple[Facts, GpuReport]:
    from mmlib.system import nvml

    report = report or nvml.probe()
    install = installed_vllm()
    total, available = _ram()
    facts = Facts(gpus=report.gpus, is_cpu=bool(install and install.is_cpu), port_in_use=port_checker(own_ports),
                  environ=dict(os.environ if environ is None else environ), ram_total=total, ram_available=available,
                  mm_pids=mm_pids)
    return facts, report


def _ram() -> tuple[int | None, int | None]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:  # a sandbox that hides /proc/meminfo
        return None, None


def machine_card(facts: Facts, gpu_memory: int | None = None) -> fitmod.Card | None:
    """The card `mm check` judges against: --gpu-memory, else the GPU capped by config.toml's gpu_budget."""
    from mmlib.profiles.config import load_config

    if gpu_memory:
        return fitmod.sized_card(gpu_memory, ram=facts.ram_total or 0)
    return fitmod.card(load_config(), GpuReport(facts.gpus), ram=facts.ram_total or 0)


# --- engine arguments, against vLLM's own parser ------------------------------------------------------
def _choices_text(choices: Iterable[str], limit: int = 8) -> str:
    items = list(choices)
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _bad_value(key: str, value: Any, action: ArgAction) -> tuple[str, str] | None:
    """(message, fix) when vLLM's parser would reject this value for this option."""
    if action.kind in ("switch", "flag"):
        if isinstance(value, bool):
            return None
        return ("is a switch", "write true or false" if action.kind == "switch" else "write true, or remove the key")
    if value is True or value is False:
        if action.nargs == "?":
            return None
        return (f"takes a value, not {str(value).lower()}", f"set engine.{key} = <value>, or remove it")
    if isinstance(value, list) and not action.takes_many:
        return ("takes one value, not a list", f"set engine.{key} to a single value")
    if isinstance(value, dict) and (action.choices or action.type in ("int", "float")):
        return ("takes a single value, not a table", f"set engine.{key} to a single value")
    for item in value if isinstance(value, list) else [value]:
        text = str(item)
        if action.choices is not None:
            ok = text.upper() in {c.upper() for c in action.choices} if action.choices_ci else text in action.choices
            if not ok:
                import difflib

                hint = difflib.get_close_matches(text.upper() if action.choices_ci else text, action.choices, n=1,
                                                 cutoff=0.6)
                fix = f'did you mean "{hint[0]}"?' if hint else f"one of: {_choices_text(action.choices)}"
                return (f"{text!r} is not one of vLLM's choices", fix)
        if action.type == "int" and not (isinstance(item, int) or text.lstrip("-").isdigit()):
            return (f"{text!r} is not a whole number", f"set engine.{key} to a whole number")
        if action.type == "float":
            try:
                float(text)
            except ValueError:
                return (f"{text!r} is not a number", f"set engine.{key} to a number")
        if action.type == "human_readable_int" and engine_int(item) is None:
            return (f"{text!r} is not a count", f"set engine.{key} to a number such as 8192 or \"8k\"")
    return None


def check_engine_args(p: Profile, spec: ArgSpec) -> list[Finding]:
    """Each [engine] key, as the argv mm builds from it, against the installed vLLM's serve parser."""
    out: list[Finding] = []
    ver = f"vLLM {spec.version}"

    def add(severity: str, key: str, message: str, fix: str, rule: str) -> None:
        out.append(Finding(severity, p.source, f"engine.{key}", message, fix, rule))

    for key, value in p.engine.items():
        if key in RESERVED_ENGINE_KEYS:
            continue  # profile.py refuses them; mm never passes them
        argv = engine_args({key: value})
        option = argv[0]
        action = spec.lookup(option)
        positive = spec.lookup(flag(key))
        if action is None and value is False and positive is not None:
            if positive.kind == "flag":
                add(ERROR, key, f"{ver}'s {positive.flag} is an on-switch only: there is no {option}",
                    "remove the key (off is already the default)", "arg-no-negation")
            else:
                add(ERROR, key, f"takes a value, not false", f"set engine.{key} = <value>, or remove it", "arg-value")
            continue
        if action is None:
            full = spec.abbreviates(flag(key))
            if full is not None:
                name = full.flag[2:].replace("-", "_")
                add(WARN, key, f"is short for {full.flag}: {ver} accepts it, but a new flag can make it ambiguous",
                    f"write engine.{name}", "arg-abbreviation")
                continue
            hint = spec.suggest(key)
            fix = rules.RENAMED_ARGS.get(key) or (f"did you mean {' or '.join('engine.' + h for h in hint)}?" if hint
                                                   else "see `vllm serve --help=all` for what exists")
            add(ERROR, key, f"{ver} has no {flag(key)} argument", fix, "arg-unknown")
            continue
        if action.deprecated:
            add(WARN, key, f"is deprecated in {ver}", "see `vllm serve --help` for its replacement", "arg-deprecated")
        bad = _bad_value(key, value, action)
        if bad:
            add(ERROR, key, *bad, "arg-value")
        elif argv.count(option) > 1 and action.kind != "append":
            add(WARN, key, f"only the last item reaches vLLM: it keeps the last of a repeated {option}",
                "list one item (mm passes a list as repeated flags)", "arg-repeated")
    return out


def check_layout_args(p: Profile, spec: ArgSpec) -> list[Finding]:
    """The flag a multi-card layout becomes (gpus, parallel), asked of the installed vLLM's parser."""
    out = []
    for key, n in layout_engine(p).items():
        action = spec.lookup(flag(key))
        other = "tensor" if p.parallel == "data" else "data"
        if action is None:
            out.append(Finding(ERROR, p.source, "parallel", f"vLLM {spec.version} has no {flag(key)}: it cannot run "
                               f"{p.parallel} parallel", f'set parallel = "{other}", or update vLLM', "layout-flag"))
        elif (bad := _bad_value(key, n, action)) is not None:
            out.append(Finding(ERROR, p.source, "gpus", f"mm passes {flag(key)} {n}: {bad[0]}", bad[1], "layout-flag"))
    return out


def check_env_names(p: Profile, spec: ArgSpec) -> list[Finding]:
    """VLLM_* variables in [env] that the installed vLLM never reads (typos, removed ones)."""
    removed = {r.name for r in rules.REMOVED_ENV}
    out = []
    for name in p.env:
        if not name.startswith("VLLM_") or name in spec.env or name in removed:
            continue
        hint = spec.suggest_env(name)
        out.append(Finding(WARN, p.source, f"env.{name}", f"vLLM {spec.version} does not read this variable",
                           f"did you mean {hint[0]}?" if hint else "remove it", "env-unknown"))
    return out


# --- memory fit -------------------------------------------------------------------------------------
def model_files(p: Profile, remote: bool = True) -> tuple[Any, dict[str, Any] | None, str]:
    """(folder, config.json, why not) for the profile's model: never downloads it, but asks the hub
    for its metadata where it is not on disk (unless remote=False: the event loop must not wait on it)."""
    from mmlib.profiles import embedded

    if not p.model:
        return None, None, "a stack has no model of its own"
    if embedded.is_embedded(p.model) and not embedded.is_ready():
        return None, None, "the embedded model is converted on its first start"
    folder = cache.model_dir(resolve_model(p.model))
    if folder is None:
        return remote_model_files(p.model) if remote else (None, None, f"no config.json for {p.model} on disk")
    cfg = modelinfo.read_config(folder)
    return folder, cfg, "" if cfg else f"cannot read {folder / 'config.json'}"


# --- fit before download: the hub's config.json and safetensors headers ----------------------------------
def remote_model_files(model: str) -> tuple[Any, dict[str, Any] | None, str]:
    """(the hub's metadata, its config.json, why not) for a model not on this machine: config.json and
    the safetensors headers by small (range) requests, so the fit is known before the download."""
    from mmlib.models import cache, hub

    if not cache.is_hub_id(model):
        return None, None, f"no config.json for {model} on this machine"
    if hub.offline():
        return None, None, f"{model} is not on this machine and HF_HUB_OFFLINE is set"
    try:
        remote = hub.remote_model(model)
    except MMError as e:
        return None, None, f"{model} is not on this machine and the hub did not say more: {e}"
    return remote, remote.config, ""


def _holders(gpu: Any, skip: frozenset[int] = frozenset()) -> str:
    procs = sorted((q for q in gpu.processes if q.pid not in skip), key=lambda q: -(q.used or 0))[:4]
    return ", ".join(f"{q.name} (pid {q.pid}" + (f", {fitmod.gib(q.used)})" if q.used else ")") for q in procs)


def footprint(p: Profile, card: fitmod.Card | None, spec: ArgSpec | None = None,
              sleepers: fitmod.Sleepers | None = None,
              files: tuple[Any, dict[str, Any] | None, str] | None = None) -> fitmod.Prediction:
    """The profile's footprint on `card`, its model's shapes found through model_files (or `files`,
    its answer already at hand): what the scheduler budgets with, and (Prediction.sizes) the flags
    server_argv adds. A KV cache sized to fill the card leaves room for `sleepers` (default: this
    machine's, sleepers_here)."""
    folder, cfg, why = files or (model_files(p) if p.model else (None, None, ""))
    if sleepers is None and card is not None and p.memory is not None and fitmod.fills_card(p.memory, p.memory.context):
        sleepers = sleepers_here(card, spec)
    fp = fitmod.predict(p, card, cfg, folder, spec, sleepers.without(p.name) if sleepers else None)
    if not why or cfg is not None:
        return fp
    notes = tuple(n.replace(fitmod.NO_SHAPES, why) for n in fp.notes)
    return replace(fp, notes=notes if notes != fp.notes else notes + (why,))


# --- the servers that may sleep beside a profile ------------------------------------------------------
def checkpoint_support(report: GpuReport | None = None, enabled: bool | None = None) -> Any:
    """Whether sleepers are checkpointed off the card here (cuda_checkpoint.Support): config.toml's
    checkpoint_sleepers, and the driver's API version as NVML reports it, so that `mm check` loads no
    CUDA library. One answer for the fit's room and for check's line."""
    from mmlib.profiles.config import checkpoint_sleepers
    from mmlib.system import nvml
    from mmlib.system.cuda_checkpoint import MIN_DRIVER_API, Support

    if not (checkpoint_sleepers() if enabled is None else enabled):
        return Support(False, "checkpoint_sleepers = false in config.toml")
    report = report if report is not None else nvml.session().report(with_processes=False)
    if not report.gpus:
        return Support(False, "no NVIDIA GPU")
    api = _driver_api(report.cuda)
    if api is None or api < MIN_DRIVER_API:
        cuda = f"CUDA {report.cuda}" if report.cuda else "no NVIDIA driver"
        return Support(False, f"the driver has no process checkpoint ({cuda}; r550, CUDA 12.4, or newer has it)", api)
    return Support(True, f"CUDA process checkpoint, driver API {api}", api)


def measured_residues() -> dict[tuple[str, str | None, str], int]:
    """(profile, model, its sizing digest) -> bytes the daemon measured its server to keep on the card
    asleep (footprints.json); empty where the daemon has measured none."""
    import json

    from mmlib import paths

    try:
        rows = json.loads(paths.footprints_file().read_text())
        return {(name, model or None, f.get("sizing", "")): int(f["asleep"]) for name, model, f in rows
                if int(f["asleep"]) > 0}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _local_model_files(p: Profile) -> tuple[Any, dict[str, Any] | None, str]:
    """model_files where the model is on this machine; never asks the hub."""
    from mmlib.profiles import embedded

    local = embedded.is_ready() if embedded.is_embedded(p.model) else cache.model_dir(resolve_model(p.model))
    return model_files(p) if local else (None, None, "not on this machine")


def sleepers_here(card: fitmod.Card, spec: ArgSpec | None = None, checkpointed: bool | None = None) -> fitmod.Sleepers:
    """Every server that may sleep on this machine and what it keeps on the card asleep: measured by
    the daemon where it ran, else predicted where its model is on this machine (one that is neither
    has never run here, so it sleeps nowhere yet). `checkpointed` None: as the driver can."""
    measured = measured_residues()
    found: list[tuple[str, int]] = []
    for p in load_all()[0]:
        if p.is_stack or not p.model or not p.sleep.enabled:
            continue
        residue = measured.get((p.name, p.model, p.sizing))
        if residue is None:
            folder, cfg, _ = _local_model_files(p)
            residue = fitmod.predict(p, card, cfg, folder, spec).asleep_bytes if cfg else None
        if residue:
            found.append((p.name, residue))
    support = checkpoint_support()
    return fitmod.Sleepers(tuple(found), support.ok if checkpointed is None else checkpointed, support.why)


def room_beside(spare: int, sleepers: fitmod.Sleepers, spare_flipped: int | None = None) -> str:
    """How many of the other servers fit asleep in `spare` bytes beside a server awake, and with the
    checkpoint the other way round (where a KV cache that fills the card leaves another spare:
    `spare_flipped`) where that differs."""
    n = len(sleepers.residues)
    if not n:
        return "no other server can sleep beside it yet (none ran here, no other profile's model is on this machine)"
    other = replace(sleepers, checkpointed=not sleepers.checkpointed)
    now, then = _fitting(spare, sleepers), _fitting(spare if spare_flipped is None else spare_flipped, other)
    text = f"room for {now[0]} other servers asleep beside it{now[1]}"
    if sleepers.checkpointed:
        return text + ", checkpointed off the card" + (f"; without the checkpoint, {then[0]}{then[1]}"
                                                        if then != now else "")
    why = sleepers.why.split(" (")[0] or "not here"  # "no CUDA driver", without the loader's details
    return text + (f"; all {n} where the CUDA driver checkpoints them ({why})" if then != now else "")


def _fitting(spare: int, sleepers: fitmod.Sleepers) -> tuple[str, str]:
    """("all 6" | "any 2 of the 6" | "2 of the 6", an aside): how many of the sleepers fit in `spare`."""
    n = len(sleepers.residues)
    any_n, most = sleepers.fitting(spare)
    if any_n == n:
        return f"all {n}", ""
    if any_n == most:
        return f"any {most} of the {n}", ""
    return f"{most} of the {n}", f" (the smallest; {any_n or 'none'} whichever they are)"


def argv_builder(card: fitmod.Card | None, spec: ArgSpec | None = None, python: str = sys.executable,
                 known: Callable[[Profile], fitmod.Prediction | None] = lambda p: None,
                 ) -> Callable[[Profile, int | str], list[str]]:
    """The supervisor's argv builder for this card: server_argv with the flags derived from the
    profile's [memory] (and a share scaled to a gpu_budget) added. `known`: a footprint already
    worked out (the daemon's preflight); else it is worked out from what is on disk."""
    def build(p: Profile, listen: int | str) -> list[str]:
        fp = known(p) or footprint(p, card, spec, files=model_files(p, remote=False) if p.model else None)
        return server_argv(p, listen, python, derived=fp.sizes)
    return build


def predicted_gib(name: str, capacity: int, spec: ArgSpec | None = None) -> float:
    """Awake GiB of a profile by name on a card of `capacity` bytes (the GPU script's predicted_gib;
    a stack: its members together)."""
    p = load_profile(name)
    members = [load_profile(m) for m in p.stack] if p.is_stack else [p]
    card = fitmod.sized_card(capacity, ram=0)
    return round(sum(footprint(m, card, spec).awake_bytes for m in members) / fitmod.GIB, 2)


def _machine_card(facts: Facts, gpu_memory: int | None, card: fitmod.Card | None) -> fitmod.Card | None:
    if card is not None:
        return card
    if gpu_memory:
        return fitmod.sized_card(gpu_memory, ram=facts.ram_total or 0)
    gpu = facts.gpu
    return fitmod.Card(gpu.total, gpu.total, gpu.name, facts.ram_total) if gpu else None


def _fix(advice: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """(key, fix text) for the most direct value that fits."""
    if not advice:
        return "", ""
    key = advice[0][0]
    texts = [v if k == "model" else f"set {k} = {v}" for k, v in advice]
    return key, "; or ".join(texts)


def check_fit(p: Profile, facts: Facts, folder: Any, cfg: dict[str, Any] | None, why: str,
              gpu_memory: int | None = None, gpu_error: str | None = None, card: fitmod.Card | None = None,
              spec: ArgSpec | None = None, sleepers: fitmod.Sleepers | None = None) -> list[Finding]:
    """The predicted footprint against the card: one line per finding, errors naming the key and the
    value that fits; where it fits, how many other servers fit asleep beside it (`sleepers`: those
    that may, default this machine's)."""
    def finding(severity: str, message: str, fix: str = "", key: str = "") -> Finding:
        key = key or ("memory" if p.memory else "engine.gpu_memory_utilization")
        return Finding(severity, p.source, key, message, fix, "memory-fit")

    if not p.model:
        return []
    card = _machine_card(facts, gpu_memory, card)
    if card is None:
        if facts.is_cpu:
            return [finding(INFO, "GPU memory fit not checked: vLLM's CPU build keeps the KV cache in RAM",
                            "pass --gpu-memory 12GiB to check it for a card")]
        return [finding(WARN, f"GPU memory fit not checked: no GPU answered ({gpu_error or 'NVML'})",
                        "run `mm doctor`; --gpu-memory 12GiB checks it for a card you name")]
    if cfg is None and not p.memory:
        return [finding(INFO, f"memory fit not estimated: {why}", "start it once, or point model at a local folder")]
    share = p.engine.get("gpu_memory_utilization")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
        return []  # rules.py reports the share itself
    here = (sleepers if sleepers is not None else sleepers_here(card, spec)).without(p.name)
    fp = fitmod.predict(p, card, cfg, folder, spec, here)
    if fp.form == "unknown":
        return [finding(INFO, f"memory fit not predicted: {why or 'config.json lacks the shapes'}",
                        "start it once, or point model at a local folder")]
    flipped = fitmod.predict(p, card, cfg, folder, spec, replace(here, checkpointed=not here.checkpointed)) \
        if fp.kept_for_sleepers or here.checkpointed else fp
    beside = room_beside(card.capacity - fp.awake_bytes, here, card.capacity - flipped.awake_bytes)
    cards_here = len(facts.gpus or ())
    return _fit_findings(p, fp, card, facts, gpu_memory, finding, beside) + _ram_findings(p, fp, facts) \
        + _derived_findings(p, fp, spec) \
        + layout.findings(p, fp, cfg, folder, cards_here, lambda q: fitmod.predict(q, card, cfg, folder, spec, here))


def _fit_findings(p: Profile, fp: fitmod.Prediction, card: fitmod.Card, facts: Facts, gpu_memory: int | None,
                  finding: Callable[..., Finding], beside: str) -> list[Finding]:
    out = []
    on = card.label() + (f", each of its {p.gpus} cards ({p.parallel} parallel)" if p.gpus > 1 else "")
    text, spare = fp.summary(where=False), card.capacity - fp.awake_bytes
    if fp.form == "share":
        text += (f" (vLLM fills its {fitmod.gib(p.memory_share * card.capacity)}"
                 " share; the CUDA context and graphs lie outside it)")
    cap = p.engine.get("gpu_memory_utilization")
    key, fix = _fix(fp.advice)
    if not fp.starts:
        need = f"one request of {fp.context:,} tokens" if fp.context else "a KV cache"
        out.append(finding(ERROR, f"vLLM would refuse to start on {on}: no room for {need}: {text}",
                           fix, key))
    elif spare < 0:
        out.append(finding(ERROR, f"does not fit {on}: {text}", fix, key))
    elif spare < fitmod.HEADROOM:
        out.append(finding(WARN, f"fits {on} only just ({fitmod.gib(spare)} spare): {text}", fix, key))
    elif p.memory and cap is not None and fp.awake_bytes > cap * card.capacity:
        wider = math.ceil(fp.awake_bytes / card.capacity * 100) / 100
        out.append(finding(ERROR, f"needs more than its gpu_memory_utilization = {cap:g} of {on}: {text}",
                           f"set engine.gpu_memory_utilization = {wider:g}", "engine.gpu_memory_utilization"))
    else:
        out.append(finding(INFO, f"fits {on}: {text}; {fitmod.gib(spare)} spare: {beside}"))
    if fp.full_requests is not None and fp.sequences and fp.starts and fp.sequences > fp.full_requests + 1e-9:
        out.append(finding(INFO, f"{fp.sequences} sequences but room for {fp.full_requests:.1f} at full length: "
                                 "long requests queue (fine for short ones)"))
    gpu = profile_gpu(p, facts)
    need = fp.awake_bytes - fitmod.CUDA_CONTEXT
    # mm sleeps or stops its own servers to make room: only what other programs hold can stop the start
    ours = sum(q.used or 0 for q in gpu.processes if q.pid in facts.mm_pids) if gpu is not None else 0
    if gpu_memory is None and gpu is not None and gpu.free + ours < need:
        room = gpu.free + ours
        floor = math.floor((room / card.capacity - 0.01) * 100) / 100
        held = _holders(gpu, skip=facts.mm_pids)
        out.append(finding(WARN, f"{fitmod.gib(gpu.free)} free on {gpu.name} now"
                                 + (f" and {fitmod.gib(ours)} that mm frees by sleeping or stopping its servers"
                                    if ours else "")
                                 + f", but the server needs {fitmod.gib(need)}; vLLM refuses to start with less"
                                 + (f" (held by {held})" if held else ""),
                           "stop the other programs holding it"
                           + (f", or lower gpu_memory_utilization to {floor:g}" if floor > 0 and not p.memory else "")))
    return out


def profile_gpu(p: Profile, facts: Facts) -> Any:
    """The first card the profile names where it names one here, else the first this machine shows."""
    named = [g for g in facts.gpus or () if p.gpu_indices and g.index == p.gpu_indices[0]]
    return named[0] if named else facts.gpu


def _ram_findings(p: Profile, fp: fitmod.Prediction, facts: Facts) -> list[Finding]:
    """Host RAM: KV offload pins its buffer, and level-1 sleep keeps the weights in RAM."""
    total = facts.ram_total
    if not total or fp.host_ram_bytes <= 0:
        return []
    offload = fp.sizes.offload_bytes or fitmod.engine_offload_bytes(p)
    key = "memory.offload" if p.memory and (p.memory.offload or p.memory.offload_fit) else "engine.kv_offloading_size"
    cost = fitmod.offload_ram(offload)
    parts = (f"{fitmod.gib(cost)} for {fitmod.gib(offload)} of KV offload + " if offload else "") + \
        f"{fitmod.gib(fp.host_ram_bytes - cost - fitmod.HOST_BASE)} of weights kept asleep + " \
        f"{fitmod.gib(fitmod.HOST_BASE)} for its processes"
    if fp.host_ram_bytes > total:
        fits = int(max(0, total - fitmod.RAM_RESERVE - (fp.host_ram_bytes - cost)) / fitmod.OFFLOAD_RAM_COST) // fitmod.GIB
        fix = (f'set memory.offload = "fit" (or {fits} GiB)' if key == "memory.offload" or p.memory
               else f"set engine.kv_offloading_size = {fits}") if offload else "use sleep level 2 (drops the weights)"
        return [Finding(ERROR, p.source, key if offload else "sleep.level",
                        f"needs {fitmod.gib(fp.host_ram_bytes)} of RAM ({parts}); this machine has {fitmod.gib(total)}",
                        fix, "memory-ram")]
    if facts.ram_available and fp.host_ram_bytes > facts.ram_available:
        return [Finding(WARN, p.source, key if offload else "sleep", f"needs {fitmod.gib(fp.host_ram_bytes)} of RAM "
                        f"({parts}); {fitmod.gib(facts.ram_available)} is available now",
                        "close other programs, or lower the offload", "memory-ram")]
    return []


def _derived_findings(p: Profile, fp: fitmod.Prediction, spec: ArgSpec | None) -> list[Finding]:
    """The flags mm derives, asked of the installed vLLM's parser like the profile's own; and what
    mm had to do without."""
    out = [Finding(WARN, p.source, "memory", note, "", "memory-flags") for note in fp.notes
           if "has no --" in note]
    derived = derived_engine(p, fp.sizes)
    if spec is None or not derived:
        return out
    extra = {k: v for k, v in derived.items() if k not in p.engine}
    probe = replace(p, engine=MappingProxyType(extra))
    for f in check_engine_args(probe, spec):
        out.append(Finding(f.severity, p.source, "memory", f"mm derives {f.key} for vLLM: {f.message}", f.fix,
                           "memory-flags"))
    return out


def checkpoint_findings(p: Profile, report: GpuReport | None, enabled: bool) -> list[Finding]:
    """Whether this profile's sleepers will be checkpointed off the card (the CUDA driver's process
    checkpoint) when room is needed, or keep their residue. The driver's API version is NVML's, so
    `mm check` loads no CUDA library."""
    if not p.sleep.enabled or report is None or not report.gpus:
        return []
    why = checkpoint_blocker(p)
    support = checkpoint_support(report, enabled)
    if why is None and not support.ok:
        why = support.why
    if why is not None:
        return [Finding(INFO, p.source, "sleep", f"asleep, it keeps its residue on the card (no checkpoint: {why})",
                        "", "checkpoint")]
    return [Finding(INFO, p.source, "sleep", f"asleep, it can give the whole card back: checkpointed to RAM "
                    f"when room is needed, restored on waking ({support.why})", "", "checkpoint")]


def _driver_api(cuda: str | None) -> int | None:
    """NVML's "13.0" as the driver API's 13000."""
    try:
        major, minor = (cuda or "").split(".")[:2]
        return int(major) * 1000 + int(minor) * 10
    except ValueError:
        return None


# --- putting it together -------------------------------------------------------------------------
def model_missing(p: Profile) -> Finding | None:
    """A hub model that is not whole in the cache while HF_HUB_OFFLINE forbids the download: vLLM
    would fail its start after half a minute of retries."""
    from mmlib.models import hub

    if not p.model or not cache.is_hub_id(p.model) or not hub.offline() or cache.complete_snapshot(p.model):
        return None
    return Finding(ERROR, p.source, "model", f"{p.model} is not on this machine and HF_HUB_OFFLINE is set",
                   f"unset HF_HUB_OFFLINE so that mm pulls it before the start, or run `mm pull {p.model}` "
                   "where the hub is reachable", "model-missing")


def check_profile(p: Profile, facts: Facts, spec: ArgSpec | None, gpu_memory: int | None = None,
                  gpu_error: str | None = None, card: fitmod.Card | None = None,
                  sleepers: fitmod.Sleepers | None = None,
                  files: tuple[Any, dict[str, Any] | None, str] | None = None) -> list[Finding]:
    folder, cfg, why = files or (model_files(p) if p.model else (None, None, ""))
    facts = replace(facts, model_config=cfg, vllm_env=spec.env if spec else None)
    found = rules.evaluate(p, facts) + [f for f in [model_missing(p)] if f]
    if spec is not None:
        found += check_engine_args(p, spec) + check_layout_args(p, spec) + check_env_names(p, spec)
    return found + check_fit(p, facts, folder, cfg, why, gpu_memory, gpu_error, card, spec, sleepers)


def check_stack(stack: Profile, members: list[Profile], card: fitmod.Card | None,
                spec: ArgSpec | None = None, sleepers: fitmod.Sleepers | None = None) -> list[Finding]:
    """A stack's members are awake together: their footprints must add up to at most the card."""
    if card is None or not members:
        return []
    prints = [footprint(m, card, spec, sleepers) for m in members]
    if any(fp.form == "unknown" for fp in prints):
        return []
    total = sum(fp.awake_bytes for fp in prints)
    each = ", ".join(f"{fp.profile} {fitmod.gib(fp.awake_bytes)}" for fp in prints)
    if total <= card.capacity - fitmod.HEADROOM:
        beside = room_beside(card.capacity - total, sleepers.without(*stack.stack)) if sleepers else ""
        return [Finding(INFO, stack.source, "stack", f"its members fit {card.label()} awake together: "
                        f"{fitmod.gib(total)} ({each})" + (f"; {beside.replace('beside it', 'beside them')}"
                                                          if beside else ""), "", "stack-fit")]
    biggest = max(prints, key=lambda fp: fp.awake_bytes)
    over = total - (card.capacity - fitmod.HEADROOM)
    member = next(m for m in members if m.name == biggest.profile)
    folder, cfg, _ = model_files(member)
    share = replace(card, capacity=biggest.awake_bytes - over + fitmod.HEADROOM)  # what is left to it
    alone = fitmod.predict(member, share, cfg, folder, spec)
    key, fix = _fix(alone.advice)
    severity = ERROR if total > card.capacity else WARN
    return [Finding(severity, member.source, key or "stack",
                    f"{stack.name}'s members need {fitmod.gib(total)} awake together ({each}), "
                    f"{'more than' if total > card.capacity else 'nearly all of'} {card.label()}",
                    fix, "stack-fit")]


def _profile_error(e: ProfileError) -> Finding:
    text = str(e)
    prefix = f"{e.file}: {e.key}: " if e.key else f"{e.file}: "
    text = text[len(prefix):] if text.startswith(prefix) else text
    suffix = f" (fix: {e.fix})"
    text = text[:-len(suffix)] if e.fix and text.endswith(suffix) else text
    return Finding(ERROR, e.file, e.key, text, e.fix, "profile")


def _expand(names: list[str]) -> tuple[list[Profile], list[Finding], list[tuple[Profile, list[Profile]]]]:
    """Profiles to check (stacks become their members), the ones that would not load, and the stacks."""
    profiles: dict[str, Profile] = {}
    errors: list[Finding] = []
    stacks: list[tuple[Profile, list[Profile]]] = []
    for name in names:
        try:
            p = load_profile(name)
        except ProfileError as e:
            errors.append(_profile_error(e))
            continue
        if not p.is_stack:
            profiles.setdefault(p.name, p)
            continue
        members = []
        for member in p.stack:
            try:
                members.append(load_profile(member))
            except ProfileError as e:
                errors.append(_profile_error(e))
        for m in members:
            profiles.setdefault(m.name, m)
        stacks.append((p, members))
        shares = sum(m.engine["gpu_memory_utilization"] for m in members if m.share_gpu
                     and isinstance(m.engine.get("gpu_memory_utilization"), (int, float)))
        if shares > 1.0:
            errors.append(Finding(ERROR, p.source, "stack", f"its members' gpu_memory_utilization add up to "
                                  f"{shares:g}, more than the whole GPU", "lower their shares so they sum to 1 or less",
                                  "stack-shares"))
    return list(profiles.values()), errors, stacks


def load_spec_quietly(announce: Callable[[str], None] | None = None) -> tuple[ArgSpec | None, Finding | None]:
    try:
        return load_spec(announce=announce), None
    except SpecUnavailable as e:
        return None, Finding(WARN, "vLLM", "", f"engine arguments not checked: {e}", "run `mm doctor`", "vllm-args")


def check(names: list[str] | None = None, gpu_memory: int | None = None, facts: Facts | None = None,
          spec: ArgSpec | None = None, report: GpuReport | None = None,
          announce: Callable[[str], None] | None = None, own_ports: frozenset[int] = frozenset(),
          model: str | None = None, mm_pids: frozenset[int] = frozenset()) -> list[Finding]:
    """Findings for the named profiles (all of them when None), errors first; `model` replaces a
    single profile's model. own_ports and mm_pids: the ports and processes of the servers mm runs."""
    names = list_profile_names() if names is None else names
    profiles, found, stacks = _expand(names)
    found += [_profile_error(e) for e in name_clashes(names + [m.name for m in profiles])]
    if model:
        if stacks or len(profiles) != 1:
            raise MMError("a model can only replace a single server's model, not a stack's")
        profiles = [profiles[0].with_model(model)]
    if facts is None:
        facts, report = machine_facts(report, own_ports=own_ports, mm_pids=mm_pids)
    if spec is None and profiles:
        spec, problem = load_spec_quietly(announce)
        found += [problem] if problem else []
    try:
        card = machine_card(facts, gpu_memory)
    except ProfileError as e:
        card, found = None, found + [_profile_error(e)]
    from mmlib.profiles.config import checkpoint_sleepers

    enabled = checkpoint_sleepers()
    sleepers = sleepers_here(card, spec) if card is not None and profiles else None  # once for all of them
    for p in profiles:
        found += check_profile(p, facts, spec, gpu_memory, report.error if report else None, card=card,
                               sleepers=sleepers)
        found += checkpoint_findings(p, report, enabled)
    for stack, members in stacks:
        found += check_stack(stack, members, card, spec, sleepers)
    order = {ERROR: 0, WARN: 1, INFO: 2}
    return sorted(found, key=lambda f: order.get(f.severity, 3))
