"""What lm-eval wrote, read for `mm eval`: every filter's score, the headline, and why a score is low.

lm-eval scores a task once per filter ("exact_match,strict-match", "exact_match,flexible-extract").
The headline is the filter that measures the model rather than its formatting, and says why. When
a filter scores zero, or far below another, the samples lm-eval logged (--log_samples) say what
happened to each answer: cut at the length limit, stopped early, empty, the API failing, a right
answer in a form the strict pattern misses, or simply a wrong answer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmlib.errors import MMError

INVALID = "[invalid]"  # what lm-eval's regex filter answers when its pattern finds nothing
LENIENT = ("flexible", "loose", "lenient")  # filter names that read the answer however it is worded
FAR_BELOW = 0.1  # a filter this far under another (or at zero) is explained
KEPT_SAMPLES = 5  # answers kept in the result file per task
EXAMPLES_PER_REASON = 2
CLIP_HEAD, CLIP_TAIL = 160, 440  # an answer's end says more than its start (that is where the answer is)
CHARS_PER_TOKEN = 4  # only where no tokenizer could count: English text runs about this
ESTIMATED_CUT = 0.75  # an estimate counts as cut from this share of the limit (numbers take more tokens)
SENTENCE_END = tuple(".!?)]}*\"'`") + tuple("0123456789")

# reason -> what it means, in the order a failed answer is checked against them
REASONS = {
    "api_error": "the API returned no content",
    "empty": "an empty answer",
    "truncated": "cut at the length limit ({limit} tokens)",
    "format": "the right answer, in a form {low} misses",
    "stopped": "ended before giving an answer, probably at a stop string ({until})",
    "no_answer": "no answer in the form {low} reads",
    "wrong": "a wrong answer in the expected form (the model's own mistake)",
}
SHORT = {"api_error": "API errors", "empty": "empty", "truncated": "cut at the length limit",
         "format": "right but worded otherwise", "stopped": "stopped early", "no_answer": "no answer found",
         "wrong": "wrong answers"}


# --- scores ---------------------------------------------------------------------------------------------
def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def score_keys(scores: dict[str, Any]) -> list[str]:
    """The "metric,filter" keys of a task's scores, in lm-eval's order (its main metric first)."""
    return [k for k in _numbers(scores) if "," in k and "_stderr" not in k]


def split_key(key: str) -> tuple[str, str]:
    metric, _, filt = key.partition(",")
    return metric, filt or "none"


def is_lenient(filt: str) -> bool:
    return any(word in filt.lower() for word in LENIENT)


def choose_headline(scores: dict[str, Any]) -> tuple[str | None, str]:
    """The key to report first, and why: the main metric; of its filters, the lenient one."""
    keys = score_keys(scores)
    if not keys:
        plain = [k for k in _numbers(scores) if "_stderr" not in k and k != "sample_len"]
        return (plain[0] if plain else None), "the task's only score"
    metric = split_key(keys[0])[0]
    same = [k for k in keys if split_key(k)[0] == metric]
    if len(same) == 1:
        return same[0], f"{metric} is the task's main metric and {split_key(same[0])[1]} its only filter"
    lenient = [k for k in same if is_lenient(split_key(k)[1])]
    if not lenient:
        return same[0], f"{metric} is the task's main metric; lm-eval lists this filter first"
    others = ", ".join(split_key(k)[1] for k in same if k != lenient[0])
    return lenient[0], (f"{split_key(lenient[0])[1]} reads the answer however it is worded, so it measures the "
                        f"model; {others} also demands the exact answer format of the examples (shown beside)")


def filter_scores(scores: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """Every filter's score of one metric, in lm-eval's order."""
    out = []
    for key in score_keys(scores):
        m, filt = split_key(key)
        if m == metric:
            stderr = scores.get(f"{m}_stderr,{filt}")
            out.append({"filter": filt, "value": scores[key],
                        "stderr": stderr if isinstance(stderr, (int, float)) else None})
    return out


def read_results(output: Path, task: str, default_limit: int | None = None) -> dict[str, Any]:
    """One task's scores from the newest results_*.json under output: the headline, every filter."""
    files = sorted(output.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise MMError(f"lm-eval wrote no results for {task} under {output}")
    raw = json.loads(files[-1].read_text())
    scores = {**raw.get("results", {}), **raw.get("groups", {})}
    if not scores:
        raise MMError(f"lm-eval's results for {task} hold no scores ({files[-1]})")
    name = task if task in scores else next(iter(scores))
    main = scores[name]
    key, reason = choose_headline(main)
    metric = split_key(key)[0] if key else "-"
    stderr = main.get(key.replace(",", "_stderr,", 1)) if key else None
    return {
        "headline": {"metric": key or "-", "value": main.get(key) if key else None,
                     "stderr": stderr if isinstance(stderr, (int, float)) else None,
                     "higher_is_better": raw.get("higher_is_better", {}).get(name, {}).get(metric),
                     "reason": reason},
        "filters": filter_scores(main, metric),
        "metrics": {n: _numbers(v) for n, v in scores.items()},
        "samples": sum(int(n.get("effective", 0)) for n in raw.get("n-samples", {}).values()),
        "generation": _generation(raw, name, default_limit),
        "lm_eval": {"version": raw.get("lm_eval_version"), "git_hash": raw.get("git_hash")},
    }


def _generation(raw: dict[str, Any], task: str, default_limit: int | None) -> dict[str, Any]:
    """What lm-eval says it used: the few-shot set-up and the task's generation arguments (the answer
    length is the task's own, else the one mm gave lm-eval's model)."""
    cfg = raw.get("configs", {}).get(task, {})
    shots = raw.get("n-shot", {}).get(task)
    kwargs = cfg.get("generation_kwargs") or {}
    return {"max_gen_toks": kwargs.get("max_tokens") or kwargs.get("max_gen_toks") or default_limit,
            "fewshot_as_multiturn": raw.get("fewshot_as_multiturn"),
            "num_fewshot": shots if shots is not None else cfg.get("num_fewshot"),
            "generation_kwargs": cfg.get("generation_kwargs"),
            "gen_kwargs": (raw.get("config") or {}).get("gen_kwargs") or None}


# --- samples ----------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """One document's answer, as each filter read it."""
    doc_id: Any
    target: str
    text: str
    read: dict[str, str] = field(default_factory=dict)  # filter -> what it extracted
    correct: dict[str, bool] = field(default_factory=dict)  # filter -> scored right
    gen_args: dict[str, Any] = field(default_factory=dict)
    tokens: int | None = None


def read_samples(output: Path) -> list[dict[str, Any]]:
    """Every line of the samples_*.jsonl files lm-eval wrote under output (--log_samples)."""
    rows = []
    for path in sorted(output.rglob("samples_*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                row["_file"] = path.name
                rows.append(row)
    return rows


def _scored(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_scored(v) for v in value)
    return bool(value) if isinstance(value, bool) else isinstance(value, (int, float)) and value >= 1


def _first(value: Any) -> Any:
    while isinstance(value, list) and value:
        value = value[0]
    return value


def answers(rows: list[dict[str, Any]], metric: str) -> list[Answer]:
    """One Answer per document (lm-eval logs each document once per filter)."""
    out: dict[tuple[str, Any], Answer] = {}
    for row in rows:
        key = (row.get("_file", ""), row.get("doc_id"))
        text = _first(row.get("resps"))
        if key not in out:
            args = (row.get("arguments") or {}).get("gen_args_0", {}).get("arg_1")
            out[key] = Answer(row.get("doc_id"), str(row.get("target", "")), text if isinstance(text, str) else "",
                              gen_args=args if isinstance(args, dict) else {})
        filt = str(row.get("filter", "none"))
        out[key].read[filt] = str(_first(row.get("filtered_resps")))
        out[key].correct[filt] = _scored(row.get(metric))
    return list(out.values())


def clip(text: str) -> str:
    if len(text) <= CLIP_HEAD + CLIP_TAIL + 20:
        return text
    return f"{text[:CLIP_HEAD]} [... {len(text) - CLIP_HEAD - CLIP_TAIL} characters ...] {text[-CLIP_TAIL:]}"


def kept(items: list[Answer], n: int = KEPT_SAMPLES) -> list[dict[str, Any]]:
    """A handful of answers for the result file, long texts clipped."""
    return [_example(a) for a in items[:n]]


def _example(a: Answer) -> dict[str, Any]:
    out = {"doc_id": a.doc_id, "target": a.target, "answer": clip(a.text), "read": a.read, "correct": a.correct}
    if a.tokens is not None:
        out["tokens"] = a.tokens
    return out


# --- API trouble in lm-eval's log ---------------------------------------------------------------------------
API_FAILED = re.compile(r"API request failed! Status code: (\d+), Response text: (.*?)(?:\. Retrying\.\.\.)?$")
API_UNPARSED = "Could not parse generations"
API_NULL = "API returned null content"


def api_trouble(log_text: str) -> dict[str, Any]:
    """What lm-eval's log says went wrong between it and the server (each failed try is a line)."""
    failed = [m for line in log_text.splitlines() if (m := API_FAILED.search(line))]
    out = {"failed_requests": len(failed),
           "unparsable_responses": log_text.count(API_UNPARSED),
           "null_content": log_text.count(API_NULL)}
    if failed:
        out["example"] = f"HTTP {failed[0].group(1)}: {failed[0].group(2)[:300]}"
    return out


def api_failure(log_text: str) -> str | None:
    """The server's answer that made lm-eval give up, for the one-line error."""
    trouble = api_trouble(log_text)
    return trouble.get("example")


# --- diagnosis ------------------------------------------------------------------------------------------
TokenCounter = Callable[[list[str]], "list[int] | None"]


def limit_of(a: Answer, default: int | None) -> int | None:
    value = a.gen_args.get("max_tokens") or a.gen_args.get("max_gen_toks") or default
    return int(value) if isinstance(value, (int, float, str)) and str(value).isdigit() else None


def count_tokens(items: list[Answer], default_limit: int | None, counter: TokenCounter | None) -> bool:
    """Sets .tokens on the answers long enough to have hit their limit; True if a tokenizer counted them
    (else the count is estimated from the length)."""
    long = [a for a in items if (lim := limit_of(a, default_limit)) and len(a.text) >= 0.8 * lim]
    counts = counter([a.text for a in long]) if counter and long else None
    for a, n in zip(long, counts or [len(a.text) // CHARS_PER_TOKEN for a in long]):
        a.tokens = n
    return counts is not None or not long


def classify(a: Answer, low: str, ref: str | None, limit: int | None, api_null: bool, counted: bool = True) -> str:
    """Why `low` scored this answer wrong (see REASONS for the order)."""
    text = a.text.strip()
    if not text:
        return "api_error" if api_null else "empty"
    # re-tokenizing the text may differ from what was generated by a token or so
    if limit and a.tokens is not None and a.tokens >= (limit - 2 if counted else ESTIMATED_CUT * limit):
        return "truncated"
    if ref and a.correct.get(ref):
        return "format"
    if a.read.get(low, INVALID) != INVALID:
        return "wrong"
    if a.text != a.text.rstrip() or not text.endswith(SENTENCE_END):
        return "stopped"
    return "no_answer"


def needs_diagnosis(filters: list[dict[str, Any]]) -> bool:
    values = [f["value"] for f in filters if isinstance(f.get("value"), (int, float))]
    return bool(values) and (min(values) == 0 or max(values) - min(values) >= FAR_BELOW)


def diagnose(entry: dict[str, Any], items: list[Answer], default_limit: int | None, api: dict[str, Any],
             counter: TokenCounter | None = None, patterns: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Why the task's lowest filter scored what it did; None when no filter is zero or far below another."""
    filters = entry.get("filters") or []
    if not items or not needs_diagnosis(filters):
        return None
    ranked = sorted(filters, key=lambda f: f["value"])
    low, best = ranked[0]["filter"], ranked[-1]["filter"]
    ref = best if best != low else None
    failed = [a for a in items if not a.correct.get(low)]
    counted = count_tokens(failed, default_limit, counter)
    groups: dict[str, list[Answer]] = {}
    for a in failed:
        reason = classify(a, low, ref, limit_of(a, default_limit), api.get("null_content", 0) > 0, counted)
        groups.setdefault(reason, []).append(a)
    fill = {"low": low, "limit": _limits(failed, default_limit), "until": _until(failed)}
    reasons = [{"reason": r, "count": len(groups[r]), "says": _says(r, fill, patterns, counted),
                "examples": [_example(a) for a in groups[r][:EXAMPLES_PER_REASON]]}
               for r in REASONS if r in groups]
    reasons.sort(key=lambda r: -r["count"])
    score = {f["filter"]: f["value"] for f in filters}
    headline = f"{low} {score[low]:.3f}" + (f" vs {ref} {score[ref]:.3f}" if ref else "")
    out = {"filter": low, "against": ref, "scores": score, "failed": len(failed), "samples": len(items),
           "reasons": reasons, "tokens": "counted" if counted else "estimated from length",
           "summary": f"{headline}: {_summary(reasons, len(failed), len(items), low)}"}
    if any(api.get(k) for k in ("failed_requests", "unparsable_responses", "null_content")):
        out["api"] = api
    return out


def _limits(items: list[Answer], default: int | None) -> str:
    found = sorted({n for a in items if (n := limit_of(a, default))})
    return "/".join(map(str, found)) or "?"


def _until(items: list[Answer]) -> str:
    stops = next((a.gen_args.get("until") for a in items if a.gen_args.get("until")), None)
    stops = [stops] if isinstance(stops, str) else stops or []
    return ", ".join(repr(s) for s in stops[:4]) or "none set"


def _says(reason: str, fill: dict[str, str], patterns: dict[str, str] | None, counted: bool) -> str:
    text = REASONS[reason].format(**fill)
    if reason in ("format", "no_answer") and patterns and patterns.get(fill["low"]):
        text += f" (it wants /{patterns[fill['low']]}/)"
    if reason == "truncated" and not counted:
        text += ", estimated from the answers' length"
    return text


def _summary(reasons: list[dict[str, Any]], failed: int, total: int, low: str) -> str:
    if [r["reason"] for r in reasons] == ["wrong"]:
        return (f"{low} scored {failed} of {total} answers wrong, each a wrong answer in the expected form: "
                "the model's mistakes, not the set-up's")
    return f"{low} scored {failed} of {total} answers wrong: " + ", ".join(
        f"{r['count']} {SHORT[r['reason']]}" for r in reasons)


def filter_patterns(output: Path, task: str) -> dict[str, str]:
    """filter name -> its first regex, from the task config lm-eval wrote (to show what it wants)."""
    files = sorted(output.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    cfg = json.loads(files[-1].read_text()).get("configs", {}).get(task, {})
    out = {}
    for f in cfg.get("filter_list") or []:
        steps = f.get("filter") or []
        pattern = next((s.get("regex_pattern") for s in steps if isinstance(s, dict) and s.get("regex_pattern")), None)
        if f.get("name") and pattern:
            out[f["name"]] = pattern
    return out


def read(output: Path, task: str, log_text: str = "", default_limit: int | None = None,
         counter: TokenCounter | None = None) -> dict[str, Any]:
    """The task's entry for the result file: scores, a few answers and, where a score needs it, why."""
    entry = read_results(output, task, default_limit)
    metric = split_key(entry["headline"]["metric"])[0]
    items = answers(read_samples(output), metric)
    entry["diagnosis"] = diagnose(entry, items, default_limit, api_trouble(log_text), counter,
                                  filter_patterns(output, task))
    entry["examples"] = kept(items)
    return entry
