"""One place per fact: vLLM's serve flags are spelled by profiles/vllm_cmd.py alone (issue 22). A flag
spelled twice drifts: guard.fit once wrote --kv-cache-memory-bytes beside the command line's own copy."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from mmlib.profiles import vllm_cmd
from mmlib.profiles.profile import list_profile_names, load_profile

ROOT = Path(__file__).resolve().parents[2] / "mmlib"
HOME = ROOT / "profiles" / "vllm_cmd.py"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w-])")
# vLLM serve flags mm names besides those below (the profile's engine keys, the sizes it derives):
# spelled here so that a second copy of them anywhere in mmlib/ is caught too.
VLLM_FLAGS = {"--uds", "--host", "--port", "--served-model-name", "--enable-sleep-mode", "--api-key",
              "--kv-cache-memory-bytes", "--max-cudagraph-capture-size", "--gpu-memory-utilization",
              "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--kv-offloading-size",
              "--kv-offloading-backend", "--enforce-eager", "--tensor-parallel-size", "--quantization",
              "--kv-cache-dtype", "--attention-backend", "--load-format", "--dtype", "--data-parallel-size"}


def literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant in a module (f-strings' text too), but docstrings (they explain) and the
    names of mm's own click options (`@click.option("--port")` is mm's flag, not vLLM's)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    skip |= {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "option" for a in n.args}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def known_flags() -> set[str]:
    """The fixed list, what vllm_cmd spells, and every shipped profile's engine keys as flags."""
    found = set(VLLM_FLAGS) | {f for _, text in literals(HOME) for f in FLAG.findall(text)}
    found |= {vllm_cmd.flag(k) for k in vllm_cmd.SIZE_KEYS.values()}
    for name in list_profile_names():
        found |= {vllm_cmd.flag(k) for k in load_profile(name).engine}
    return found


def spelled_outside(known: set[str], root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        if path == HOME:
            continue
        for line, text in literals(path):
            out += [f"{path.relative_to(root.parent)}:{line}: {f}" for f in FLAG.findall(text)
                    if f in known or f.replace("--no-", "--", 1) in known]
    return out


def test_vllm_flags_are_spelled_only_by_vllm_cmd(mm_env):
    assert spelled_outside(known_flags()) == []


def test_the_scan_finds_a_flag_spelled_elsewhere(mm_env, tmp_path):
    stray = tmp_path / "mmlib" / "guard" / "stray.py"
    stray.parent.mkdir(parents=True)
    stray.write_text('"""--max-num-seqs in a docstring explains."""\nARGV = ["--max-num-seqs", f"--no-enforce-eager={1}"]\n'
                     '@click.option("--port", type=int)\ndef serve(port): """mm\'s own --port."""\n')
    assert spelled_outside(known_flags(), tmp_path / "mmlib") == ["mmlib/guard/stray.py:2: --max-num-seqs",
                                                                  "mmlib/guard/stray.py:2: --no-enforce-eager"]


# Facts besides the flags, each with the one module that may spell it.
HOMES = {"mm.sock": "mmlib/paths.py", "daemon.log": "mmlib/paths.py", "***": "mmlib/profiles/profile.py"}


def test_paths_and_masking_are_spelled_once():
    found = {(text, str(path.relative_to(ROOT.parent))) for path in ROOT.rglob("*.py")
             for _, text in literals(path) if text in HOMES}
    assert found == set(HOMES.items())


def test_each_calibration_figure_names_its_result_of_record():
    from mmlib.guard import calibration, fit

    results = ROOT.parent / "benchmark_results"
    for name, figure in calibration.FIGURES.items():
        files = re.findall(r"[\w.-]+\.(?:txt|log)", figure.source)
        assert files and all((results / f).is_file() for f in files), (name, figure.source)
        assert getattr(fit, name) == figure.value and figure.why
