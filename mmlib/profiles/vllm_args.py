"""Which `vllm serve` arguments and environment variables the installed vLLM reads, asked of vLLM.

mm keeps no list of vLLM flags (STYLE.md): `python -m mmlib.profiles.vllm_args` imports vLLM's own serve
parser in a helper process (seconds: it imports much of vLLM) and prints every option as JSON.
`load_spec()` runs that once per installed vLLM build and keeps the answer in the user cache, so
later checks read one small file; the CLI never imports vllm. `python -m mmlib.profiles.vllm_args --parse
ARG...` asks the real parser whether it accepts an argv (tests and the device script use it).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

SCHEMA = 2
HELPER_TIMEOUT_S = 300.0  # a cold first import of vLLM on a slow disk can take a minute or more
# Where each vLLM release keeps the serve parser (newest first).
PARSER_MODULES = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")
ENV_NAME_RE = re.compile(r"\bVLLM_[A-Z0-9_]*[A-Z0-9]\b")


@dataclass(frozen=True)
class ArgAction:
    dest: str
    options: tuple[str, ...]
    # "switch": --x and --no-x; "flag": --x only (store_true); "value": takes a value;
    # "append": repeatable; "other": a custom action (accepted as is)
    kind: str
    nargs: Any = None
    choices: tuple[str, ...] | None = None
    type: str | None = None
    deprecated: bool = False
    choices_ci: bool = False  # vLLM upper-cases the value before looking it up (attention backends)

    @property
    def flag(self) -> str:
        """The long spelling, for messages."""
        return next((o for o in self.options if o.startswith("--") and not o.startswith("--no-")),
                    self.options[0])

    @property
    def takes_many(self) -> bool:
        return self.kind == "append" or self.nargs in ("+", "*") or isinstance(self.nargs, int) and self.nargs > 1


@dataclass(frozen=True)
class ArgSpec:
    distribution: str
    version: str
    actions: tuple[ArgAction, ...]
    env: frozenset[str] = field(default_factory=frozenset)

    @cached_property
    def by_option(self) -> dict[str, ArgAction]:
        return {o: a for a in self.actions for o in a.options}

    def lookup(self, option: str) -> ArgAction | None:
        return self.by_option.get(option)

    def abbreviates(self, option: str) -> ArgAction | None:
        """argparse accepts a unique prefix of a long option (allow_abbrev)."""
        hits = {a for o, a in self.by_option.items() if o.startswith(option) and o.startswith("--")}
        return hits.pop() if len(hits) == 1 else None

    def suggest(self, key: str, n: int = 2) -> list[str]:
        """Engine keys (snake_case) close to `key`."""
        keys = sorted({o[2:].replace("-", "_") for o in self.by_option
                       if o.startswith("--") and not o.startswith("--no-")})
        return difflib.get_close_matches(key, keys, n=n, cutoff=0.7)

    def suggest_env(self, name: str) -> list[str]:
        return difflib.get_close_matches(name, sorted(self.env), n=1, cutoff=0.8)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ArgSpec":
        actions = tuple(ArgAction(dest=a["dest"], options=tuple(a["options"]), kind=a["kind"], nargs=a.get("nargs"),
                                  choices=tuple(a["choices"]) if a.get("choices") is not None else None,
                                  type=a.get("type"), deprecated=a.get("deprecated", False),
                                  choices_ci=a.get("choices_ci", False))
                        for a in doc["actions"])
        return cls(doc["distribution"], doc["version"], actions, frozenset(doc.get("env", ())))


class SpecUnavailable(Exception):
    """vLLM's parser could not be asked (not installed, or its import failed): checks skip arguments."""


# --- the mm side: cached, never imports vllm -------------------------------------------------------
def cache_path(distribution: str, version: str) -> Path:
    from mmlib import paths

    safe = re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{distribution}-{version}")
    return paths.cache_dir() / "vllm-args" / f"v{SCHEMA}-{safe}.json"


def load_spec(install: Any = None, python: str = sys.executable, refresh: bool = False,
              announce: Any = None) -> ArgSpec:
    """The installed vLLM's serve arguments, from the cache or (once per build) the helper process.

    `announce(text)` is called before the slow path so a user knows why the first check waits."""
    from mmlib.profiles import vllm_cmd

    install = install or vllm_cmd.installed_vllm()
    if install is None:
        raise SpecUnavailable("vLLM is not installed (run ./mm once to set up its virtual environment)")
    path = cache_path(install.distribution, install.version)
    if path.is_file() and not refresh:
        try:
            return ArgSpec.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # a broken cache file is rebuilt below
    if announce:
        announce(f"reading vLLM {install.version}'s arguments (once per vLLM version) ...")
    doc = run_helper([], python=python)
    doc.update(distribution=install.distribution, version=install.version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return ArgSpec.from_json(doc)


def helper_env() -> dict[str, str]:
    """The environment a server gets (VLLM_TARGET_DEVICE=cpu on the CPU build), quiet logging."""
    from mmlib.profiles.profile import Profile
    from mmlib.profiles.vllm_cmd import server_env

    env = server_env(Profile(name="vllm-args", source="mm"))
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    return env


def run_helper(args: list[str], python: str = sys.executable, timeout: float = HELPER_TIMEOUT_S) -> dict[str, Any]:
    try:
        proc = subprocess.run([python, "-m", "mmlib.profiles.vllm_args", *args], capture_output=True, text=True,
                              env=helper_env(), timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        raise SpecUnavailable(f"vLLM's argument parser did not load within {timeout:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SpecUnavailable(f"vLLM's argument parser could not be loaded: {tail[:300]}")
    try:
        return json.loads(lines[-1])
    except ValueError:
        raise SpecUnavailable(f"vLLM's argument parser answered oddly: {lines[-1][:300]}") from None


def parse_with_vllm(argvs: list[list[str]], python: str = sys.executable) -> list[tuple[bool, str]]:
    """Does the installed vLLM's serve parser accept each argv (the flags after the model)? One
    helper process for all of them; slow (it imports vLLM)."""
    docs = run_helper(["--parse-json", json.dumps(argvs)], python=python)["results"]
    return [(d["ok"], d.get("error", "")) for d in docs]


# --- the helper process: imports vllm ------------------------------------------------------------
def _serve_parser() -> argparse.ArgumentParser:
    import importlib

    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for name in PARSER_MODULES:
        try:
            make = importlib.import_module(name).make_arg_parser
        except (ImportError, AttributeError):
            continue
        return make(FlexibleArgumentParser(prog="vllm serve"))
    raise ImportError(f"no make_arg_parser in {', '.join(PARSER_MODULES)}")


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "switch"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        return "flag"
    if isinstance(action, argparse._AppendAction):
        return "append"
    if type(action) is argparse._StoreAction:
        return "value"
    return "other" if action.nargs != 0 else "flag"


def _type_name(action: argparse.Action) -> str | None:
    t = action.type
    return None if t is None else getattr(t, "__name__", type(t).__name__)


def _env_names() -> list[str]:
    """Every VLLM_* name vLLM declares in envs.py or spells anywhere in its source."""
    import vllm
    import vllm.envs as envs

    names = set(getattr(envs, "environment_variables", {}))
    for path in Path(vllm.__file__).parent.rglob("*.py"):
        try:
            names.update(ENV_NAME_RE.findall(path.read_text(errors="ignore")))
        except OSError:
            continue
    return sorted(names)


def _attention_backends() -> list[str] | None:
    """--attention-backend takes any string at parse time; vLLM looks it up in an enum later."""
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
    except ImportError:
        return None
    return ["auto", *(m.name for m in AttentionBackendEnum)]


def dump() -> dict[str, Any]:
    parser = _serve_parser()
    deprecated = getattr(parser, "_deprecated", set())
    actions = []
    for a in parser._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction):
            continue
        doc = {
            "dest": a.dest, "options": list(a.option_strings), "kind": _kind(a),
            "nargs": a.nargs if isinstance(a.nargs, (int, str)) else None,
            "choices": [str(c) for c in a.choices] if a.choices is not None else None,
            "type": _type_name(a), "deprecated": bool(getattr(a, "deprecated", False) or a in deprecated),
        }
        if a.dest == "attention_backend" and a.choices is None:
            doc.update(choices=_attention_backends(), choices_ci=True)
        actions.append(doc)
    return {"schema": SCHEMA, "actions": actions, "env": _env_names()}


def parse(argv: list[str]) -> dict[str, Any]:
    import contextlib
    import io

    parser = _serve_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(["mm-check-model", *argv])
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        return {"ok": False, "error": lines[-1] if lines else "rejected"}
    except Exception as e:  # vLLM raises some of its own errors directly
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True}


def _keep_bytecode() -> None:
    """pip writes a package's bytecode (.pyc) when it installs it, PYTHONDONTWRITEBYTECODE or not; uv,
    mm's installer, leaves it to the first import, and with PYTHONDONTWRITEBYTECODE set no import ever
    writes it: each vLLM start then compiles the ~5000 modules it imports again (+40 s on a 2-core
    CPU). This helper imports most of them, from mm's own virtual environment, so it writes their
    bytecode there, as pip would have at install. Outside a virtual environment it leaves the setting be."""
    if sys.prefix != sys.base_prefix:
        sys.dont_write_bytecode = False


def main(args: list[str]) -> None:
    _keep_bytecode()
    if args[:1] == ["--parse"]:  # --parse [--] FLAG...: one argv
        doc = parse(args[args.index("--") + 1:] if "--" in args else args[1:])
    elif args[:1] == ["--parse-json"]:  # --parse-json '[[FLAG, ...], ...]': many
        doc = {"results": [parse(argv) for argv in json.loads(args[1])]}
    else:
        doc = dump()
    sys.stdout.write("\n" + json.dumps(doc) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
