"""Reading lm-eval's output: every filter, the headline and its reason, and the diagnosis of a low
score, fed with real recorded output (tests/fixtures/lm_eval) and variants made from it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmlib.errors import MMError
from mmlib.measure import lm_eval_output as out

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "lm_eval"
STRICT, FLEX = "strict-match", "flexible-extract"
GSM8K_SCORES = {"alias": "gsm8k_cot", "sample_len": 30, "exact_match,strict-match": 0.4,
                "exact_match_stderr,strict-match": 0.09, "exact_match,flexible-extract": 0.5,
                "exact_match_stderr,flexible-extract": "N/A"}


def recorded(tmp_path: Path, name: str) -> Path:
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / name


def samples_file(output: Path) -> Path:
    return next(output.rglob("samples_*.jsonl"))


def rewrite(output: Path, answers: dict[int, tuple[str, str, str]]) -> None:
    """Give documents new answers: doc_id -> (text, what strict-match read, what flexible-extract read),
    scored as lm-eval would (against the target), then the results' means recomputed."""
    path = samples_file(output)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if row["doc_id"] in answers:
            text, strict, flexible = answers[row["doc_id"]]
            read = strict if row["filter"] == STRICT else flexible
            row["resps"], row["filtered_resps"] = [[text]], [read]
            row["exact_match"] = float(read.rstrip(".") == row["target"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = next(output.rglob("results_*.json"))
    raw = json.loads(results.read_text())
    for filt in (STRICT, FLEX):
        scores = [r["exact_match"] for r in rows if r["filter"] == filt]
        raw["results"]["mm_gsm8k"][f"exact_match,{filt}"] = sum(scores) / len(scores)
    results.write_text(json.dumps(raw))


def reasons(entry: dict) -> dict[str, int]:
    return {r["reason"]: r["count"] for r in entry["diagnosis"]["reasons"]}


def no_counter(texts):
    raise AssertionError(f"nothing here is long enough to count: {texts}")


# --- scores and the headline -------------------------------------------------------------------------
def test_headline_is_the_flexible_filter_with_its_reason():
    key, reason = out.choose_headline(GSM8K_SCORES)
    assert key == "exact_match,flexible-extract"
    assert reason.startswith("flexible-extract reads the answer however it is worded") and "strict-match" in reason


def test_headline_of_other_shapes():
    assert out.choose_headline({"exact_match,last-number": 0.3})[0] == "exact_match,last-number"
    assert "its only filter" in out.choose_headline({"exact_match,last-number": 0.3})[1]
    ifeval = {"prompt_level_strict_acc,none": 0.2, "inst_level_strict_acc,none": 0.3,
              "prompt_level_loose_acc,none": 0.25}
    assert out.choose_headline(ifeval)[0] == "prompt_level_strict_acc,none"  # its metric, not a filter
    two = {"acc,first": 0.1, "acc,second": 0.2}
    assert out.choose_headline(two) == ("acc,first", "acc is the task's main metric; lm-eval lists this filter first")
    assert out.choose_headline({"acc": 0.5, "acc_stderr": 0.1}) == ("acc", "the task's only score")


def test_every_filter_is_kept_beside_the_headline(tmp_path):
    d = tmp_path / "o" / "model"
    d.mkdir(parents=True)
    (d / "results_x.json").write_text(json.dumps({
        "results": {"gsm8k_cot": GSM8K_SCORES}, "higher_is_better": {"gsm8k_cot": {"exact_match": True}},
        "n-samples": {"gsm8k_cot": {"original": 1319, "effective": 30}}, "lm_eval_version": "0.4.13"}))
    got = out.read_results(tmp_path / "o", "gsm8k_cot", 1024)
    assert got["headline"]["metric"] == "exact_match,flexible-extract" and got["headline"]["value"] == 0.5
    assert got["headline"]["stderr"] is None and got["headline"]["higher_is_better"] is True
    assert got["filters"] == [{"filter": STRICT, "value": 0.4, "stderr": 0.09},
                              {"filter": FLEX, "value": 0.5, "stderr": None}]
    assert got["samples"] == 30 and got["generation"]["max_gen_toks"] == 1024


def test_a_group_reads_its_own_scores(tmp_path):
    d = tmp_path / "o" / "m"
    d.mkdir(parents=True)
    (d / "results_x.json").write_text(json.dumps({
        "results": {"a": {"acc,none": 0.5}, "b": {"acc,none": 0.7}}, "groups": {"grp": {"acc,none": 0.6,
                                                                                       "acc_stderr,none": 0.1}},
        "n-samples": {"a": {"effective": 30}, "b": {"effective": 30}}}))
    got = out.read_results(tmp_path / "o", "grp")
    assert got["headline"]["value"] == 0.6 and got["headline"]["stderr"] == 0.1 and got["samples"] == 60


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(MMError, match="wrote no results for t"):
        out.read_results(tmp_path, "t")


# --- recorded output ------------------------------------------------------------------------------------
def test_recorded_run_where_the_model_is_simply_wrong(tmp_path):
    entry = out.read(recorded(tmp_path, "mm_gsm8k-multiturn"), "mm_gsm8k", "", 256,
                     lambda texts: [len(t) // 4 for t in texts])  # lm-eval's default length was used
    assert [f["value"] for f in entry["filters"]] == [0.0, 0.0]
    assert entry["generation"]["fewshot_as_multiturn"] is True and entry["generation"]["num_fewshot"] == 8
    diag = entry["diagnosis"]
    assert diag["filter"] == STRICT and diag["against"] == FLEX and diag["failed"] == diag["samples"] == 5
    assert reasons(entry) == {"wrong": 5}
    assert diag["summary"] == ("strict-match 0.000 vs flexible-extract 0.000: strict-match scored 5 of 5 answers "
                               "wrong, each a wrong answer in the expected form: the model's mistakes, not the set-up's")
    assert len(entry["examples"]) == out.KEPT_SAMPLES
    first = entry["examples"][0]
    assert first["target"] == "7" and first["read"] == {STRICT: "24", FLEX: "24."}
    assert "The answer is 24." in first["answer"]


def test_recorded_run_with_answers_cut_at_the_length_limit(tmp_path):
    counted = []

    def counter(texts):
        counted.extend(texts)
        return [64 if len(t) > 100 else len(t) // 4 for t in texts]
    entry = out.read(recorded(tmp_path, "mm_gsm8k-64tok"), "mm_gsm8k", "", 1024, counter)
    assert entry["generation"]["max_gen_toks"] == 64 and entry["generation"]["fewshot_as_multiturn"] is False
    assert reasons(entry) == {"wrong": 5, "truncated": 3}
    assert all(len(t) >= 0.8 * 64 for t in counted)  # only answers long enough to have hit the limit
    truncated = next(r for r in entry["diagnosis"]["reasons"] if r["reason"] == "truncated")
    assert truncated["says"] == "cut at the length limit (64 tokens)" and len(truncated["examples"]) == 2
    assert truncated["examples"][0]["tokens"] == 64 and truncated["examples"][0]["answer"].endswith("The answer is ")
    assert entry["diagnosis"]["tokens"] == "counted"
    assert "8 of 8 answers wrong: 5 wrong answers, 3 cut at the length limit" in entry["diagnosis"]["summary"]


def test_lengths_are_estimated_when_no_tokenizer_counts(tmp_path):
    entry = out.read(recorded(tmp_path, "mm_gsm8k-64tok"), "mm_gsm8k", "", 1024, lambda texts: None)
    assert entry["diagnosis"]["tokens"] == "estimated from length"
    assert reasons(entry)["wrong"] >= 5  # 4 characters a token: the 106-163 character answers stay under 64
    long = "Let me work through this step by step. " * 120
    output = recorded(tmp_path / "b", "mm_gsm8k-multiturn")
    rewrite(output, {0: (long, out.INVALID, "[invalid]")})
    entry = out.read(output, "mm_gsm8k", "", 1024, lambda texts: None)
    cut = next(r for r in entry["diagnosis"]["reasons"] if r["reason"] == "truncated")
    assert cut["count"] == 1 and cut["says"].endswith("estimated from the answers' length")
    assert "characters ...]" in cut["examples"][0]["answer"] and len(cut["examples"][0]["answer"]) < 700


# --- variants ---------------------------------------------------------------------------------------------
# two right answers worded otherwise than "The answer is N.": strict 0.0, flexible 0.4
INVALID_FORMAT_ANSWERS = {
    0: ("She makes 24 + 18 = 42 muffins and sells 35, so she has **7** muffins left.", out.INVALID, "7."),
    1: ("He reads 12 * 5 = 60 pages, then 20 more.\n\nTotal: 80 pages", out.INVALID, "80")}


def test_strict_zero_flexible_point_four_is_a_format_problem(tmp_path):
    output = recorded(tmp_path, "mm_gsm8k-multiturn")
    rewrite(output, INVALID_FORMAT_ANSWERS)
    entry = out.read(output, "mm_gsm8k", "", 256, no_counter)
    assert entry["headline"]["metric"] == "exact_match,flexible-extract" and entry["headline"]["value"] == 0.4
    assert [(f["filter"], f["value"]) for f in entry["filters"]] == [(STRICT, 0.0), (FLEX, 0.4)]
    diag = entry["diagnosis"]
    assert diag["filter"] == STRICT and diag["against"] == FLEX and reasons(entry) == {"wrong": 3, "format": 2}
    fmt = next(r for r in diag["reasons"] if r["reason"] == "format")
    assert fmt["says"].startswith("the right answer, in a form strict-match misses (it wants /The answer is")
    assert [e["target"] for e in fmt["examples"]] == ["7", "80"]
    assert diag["summary"].startswith("strict-match 0.000 vs flexible-extract 0.400: ")


def test_empty_answers(tmp_path):
    output = recorded(tmp_path, "mm_gsm8k-multiturn")
    rewrite(output, {i: ("", out.INVALID, out.INVALID) for i in range(5)})
    entry = out.read(output, "mm_gsm8k", "", 256, no_counter)
    assert reasons(entry) == {"empty": 5} and "5 empty" in entry["diagnosis"]["summary"]
    assert "api" not in entry["diagnosis"]


def test_api_errors_from_lm_evals_log(tmp_path):
    output = recorded(tmp_path, "mm_gsm8k-multiturn")
    rewrite(output, {0: ("", out.INVALID, out.INVALID), 1: ("", out.INVALID, out.INVALID)})
    log = ("2026-01-01 WARNING [api_models:545] API returned null content. Content filled with "
           "`LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER = `. Check reasoning_content field or generation limits.\n") * 2 + \
          ("2026-01-01 WARNING [api_models:521] API request failed! Status code: 503, Response text: "
           "Service Unavailable. Retrying...\n")
    entry = out.read(output, "mm_gsm8k", log, 256, no_counter)
    assert reasons(entry) == {"wrong": 3, "api_error": 2}
    assert entry["diagnosis"]["api"] == {"failed_requests": 1, "unparsable_responses": 0, "null_content": 2,
                                         "example": "HTTP 503: Service Unavailable"}


def test_stopped_early_and_no_answer(tmp_path):
    output = recorded(tmp_path, "mm_gsm8k-multiturn")
    rewrite(output, {0: ("First the baker makes muffins in the morning and\n\n", out.INVALID, out.INVALID),
                     1: ("I cannot work that out.", out.INVALID, out.INVALID)})
    entry = out.read(output, "mm_gsm8k", "", 256, no_counter)
    assert reasons(entry) == {"wrong": 3, "stopped": 1, "no_answer": 1}
    stopped = next(r for r in entry["diagnosis"]["reasons"] if r["reason"] == "stopped")
    assert stopped["says"] == "ended before giving an answer, probably at a stop string ('Q:', '</s>', '<|im_end|>')"


def test_no_diagnosis_when_filters_agree_and_score(tmp_path):
    output = recorded(tmp_path, "mm_gsm8k-multiturn")
    right = {i: (f"... The answer is {t}.", t, f"{t}.") for i, t in enumerate(["7", "80", "38", "14", "51"])}
    rewrite(output, right)
    entry = out.read(output, "mm_gsm8k", "", 256, no_counter)
    assert entry["headline"]["value"] == 1.0 and entry["diagnosis"] is None and entry["examples"]


@pytest.mark.parametrize("values, needed", [
    ((0.0, 0.0), True), ((0.0, 0.4), True), ((0.5, 0.45), False), ((0.3, 0.5), True), ((0.7,), False), ((0.0,), True)])
def test_when_a_score_needs_explaining(values, needed):
    assert out.needs_diagnosis([{"filter": str(i), "value": v} for i, v in enumerate(values)]) is needed


def test_api_failure_names_what_the_server_said():
    assert out.api_failure("nothing here\n") is None
    line = "WARNING API request failed! Status code: 400, Response text: {\"error\": \"too long\"}. Retrying..."
    assert out.api_failure(line) == 'HTTP 400: {"error": "too long"}'
