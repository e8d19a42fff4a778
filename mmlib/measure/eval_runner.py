"""Helper process for `mm eval` (imports lm_eval, so the CLI never does).

    python -m mmlib.measure.eval_runner check [--include-path DIR] TASK...

prints one JSON object: for each name asked, whether lm-eval knows it, its leaf tasks and each
leaf's output_type, plus close matches for unknown names. `mm eval` refuses the tasks that need
log-likelihoods, which a chat-completions API cannot serve.

    python -m mmlib.measure.eval_runner tokens TOKENIZER < texts.json

prints the token count of each text (a JSON list of strings) with the server's tokenizer, so the
diagnosis of a low score can tell an answer cut at the length limit (transformers is imported here
only).
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from typing import Any

GENERATIVE = "generate_until"


def _cfg_type(cfg: dict[str, Any] | None) -> str:
    return (cfg or {}).get("output_type") or GENERATIVE


def leaves(name: str, index: dict[str, Any], depth: int = 0) -> dict[str, str | None]:
    """{leaf task: output_type}; None for a name lm-eval does not know, "python" where a task is a
    Python class whose type shows only once built."""
    entry = index.get(name)
    if entry is None or depth > 8:
        return {name: None}
    kind = getattr(getattr(entry, "kind", None), "name", None)
    if kind == "TAG":
        members = sorted(entry.tags)
    elif kind == "GROUP":
        members = (entry.cfg or {}).get("task") or []
        members = members if isinstance(members, list) else [members]
    elif kind == "TASK":
        return {name: _cfg_type(entry.cfg)}
    else:  # PY_TASK, or an index entry of an lm-eval version this does not know
        return {name: (entry.cfg or {}).get("output_type", "python") if hasattr(entry, "cfg") else "python"}
    out: dict[str, str | None] = {}
    for m in members:
        if isinstance(m, dict):  # an inline task config inside a group
            inner = m.get("task") if isinstance(m.get("task"), str) else None
            if inner and inner in index and "output_type" not in m:
                out.update(leaves(inner, index, depth + 1))
            else:
                out[inner or str(m.get("task"))] = _cfg_type(m)
        else:
            out.update(leaves(str(m), index, depth + 1))
    return out


def check(names: list[str], include_path: str | None) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_path)
    index = tm.task_index
    out: dict[str, Any] = {"tasks": {}}
    for name in names:
        found = leaves(name, index)
        entry = {"known": name in index, "leaves": found}
        if name not in index:
            entry["suggest"] = difflib.get_close_matches(name, list(index), n=3)
        out["tasks"][name] = entry
    return out


def count_tokens(tokenizer: str, texts: list[str]) -> list[int]:
    """Token counts without special tokens; the tokenizers library where the folder has tokenizer.json
    (it loads in a fraction of transformers' time), else transformers (a hub id, an old format)."""
    from pathlib import Path

    found = Path(tokenizer) / "tokenizer.json"
    if not found.is_file() and not Path(tokenizer).exists():  # a hub id: the copy the server downloaded
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(tokenizer, "tokenizer.json")
        found = Path(cached) if isinstance(cached, str) else found
    if found.is_file():
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(found))
        return [len(e.ids) for e in fast.encode_batch(texts, add_special_tokens=False)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmlib.measure.eval_runner")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="classify tasks by output type")
    c.add_argument("--include-path")
    c.add_argument("tasks", nargs="+")
    t = sub.add_parser("tokens", help="count tokens of the texts (a JSON list on stdin)")
    t.add_argument("tokenizer")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # lm-eval's index warnings would drown the JSON's reader
    if args.command == "tokens":
        json.dump(count_tokens(args.tokenizer, json.load(sys.stdin)), sys.stdout)
    else:
        json.dump(check(args.tasks, args.include_path), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
