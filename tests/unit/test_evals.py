"""`mm eval`'s logic: the local task, refusing log-likelihood tasks, lm-eval's argv and results."""
from __future__ import annotations

import json
import re
import types

import pytest

from mmlib.errors import MMError
from mmlib.measure import eval_runner, evals
from mmlib.measure.helper import Target
from mmlib.profiles.profile import load_profile
from tests.unit.test_results import FakeSampler

yaml = pytest.importorskip("yaml")

TARGET = Target(url="http://127.0.0.1:9999", served_model_name="smollm2", tokenizer="/m", env={})


def test_local_task_data_has_known_numeric_answers():
    rows = [json.loads(line) for line in (evals.TASKS_DIR / "mm_arith.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and len({r["question"] for r in rows}) == 100
    for r in rows:
        numbers = [int(n) for n in re.findall(r"\d+", r["question"])]
        answer = int(r["answer"])
        if "more" in r["question"]:
            assert answer == numbers[0] + numbers[1]
        elif "gave away" in r["question"]:
            assert answer == numbers[0] - numbers[1]
        elif "boxes" in r["question"]:
            assert answer == numbers[0] * numbers[1]
        elif "equally" in r["question"]:
            assert answer == numbers[0] // numbers[1] and numbers[0] % numbers[1] == 0
        else:
            assert answer == sum(numbers)


def test_prepare_tasks_writes_an_absolute_data_path(tmp_path):
    include = evals.prepare_tasks(tmp_path)
    cfg = yaml.safe_load((include / "mm_arith.yaml").read_text())
    data = cfg["dataset_kwargs"]["data_files"]["test"]
    assert cfg["dataset_path"] == "json" and cfg["output_type"] == "generate_until"
    assert data.startswith("/") and data.endswith("mm_arith.jsonl")
    assert cfg["filter_list"][0]["filter"][0]["function"] == "regex"
    assert cfg["metric_list"][0]["metric"] == "exact_match"


def check_doc(**tasks):
    return {"tasks": tasks}


def test_refusal_names_the_reason():
    ok = {"known": True, "leaves": {"gsm8k_cot": "generate_until"}}
    assert evals.refusal(check_doc(gsm8k_cot=ok)) is None
    msg = evals.refusal(check_doc(gsm8k_cot=ok, hellaswag={"known": True, "leaves": {"hellaswag": "multiple_choice"}}))
    assert "'hellaswag' is multiple_choice" in msg and "log-likelihoods" in msg and "chat-completions" in msg
    group = {"known": True, "leaves": {"a": "generate_until", "b": "loglikelihood", "c": "loglikelihood"}}
    assert "'grp' (2 of its tasks, e.g. b)" in evals.refusal(check_doc(grp=group))
    unknown = {"known": False, "leaves": {"gsm8k_co": None}, "suggest": ["gsm8k_cot", "gsm8k"]}
    assert evals.refusal(check_doc(gsm8k_co=unknown)) == \
        "lm-eval has no task 'gsm8k_co' (fix: did you mean gsm8k_cot or gsm8k?)"


def entry(kind, cfg=None, tags=()):
    return types.SimpleNamespace(kind=types.SimpleNamespace(name=kind), cfg=cfg, tags=set(tags))


def test_runner_walks_groups_tags_and_inline_configs():
    index = {
        "gen": entry("TASK", {"task": "gen", "output_type": "generate_until"}),
        "mc": entry("TASK", {"task": "mc", "output_type": "multiple_choice"}),
        "plain": entry("TASK", {"task": "plain"}),  # lm-eval's default output type is generate_until
        "grp": entry("GROUP", {"group": "grp", "task": ["gen", "tagged", {"task": "inline",
                                                                           "output_type": "loglikelihood"}]}),
        "tagged": entry("TAG", tags=["mc", "plain"]),
        "py": entry("PY_TASK", {"class": "X"}),
    }
    assert eval_runner.leaves("grp", index) == {"gen": "generate_until", "mc": "multiple_choice",
                                                "plain": "generate_until", "inline": "loglikelihood"}
    assert eval_runner.leaves("nope", index) == {"nope": None}
    assert eval_runner.leaves("py", index) == {"py": "python"}


def test_lm_eval_argv(tmp_path):
    argv = evals.lm_eval_argv("gsm8k_cot", TARGET, tmp_path / "tasks", tmp_path / "out", 30, 8, python="py")
    assert argv[:3] == ["py", "-m", "lm_eval"]
    model_args = argv[argv.index("--model_args") + 1]
    assert model_args.startswith("base_url=http://127.0.0.1:9999/v1/chat/completions,model=smollm2,")
    assert "tokenizer_backend=None" in model_args and "num_concurrent=8" in model_args
    assert argv[argv.index("--model") + 1] == "local-chat-completions" and "--apply_chat_template" in argv
    assert argv[argv.index("--limit") + 1] == "30" and argv[argv.index("--tasks") + 1] == "gsm8k_cot"
    assert "--limit" not in evals.lm_eval_argv("t", TARGET, tmp_path, tmp_path, None, 1)
    keyed = evals.lm_eval_argv("t", Target(**{**TARGET.__dict__, "api_key": "sk-1"}), tmp_path, tmp_path, None, 1)
    assert "auth_token=sk-1" in keyed[keyed.index("--model_args") + 1]


def lm_eval_output(tmp_path, results, groups=None):
    d = tmp_path / "out" / "smollm2"
    d.mkdir(parents=True)
    raw = {"results": results, "groups": groups or {}, "lm_eval_version": "0.4.13", "git_hash": "abc",
           "higher_is_better": {"gsm8k_cot": {"exact_match": True}},
           "n-samples": {t: {"original": 1319, "effective": 30} for t in results}}
    (d / "results_2026-01-01T00-00-00.json").write_text(json.dumps(raw))
    return tmp_path / "out"


def test_read_lm_eval_results(tmp_path):
    out = lm_eval_output(tmp_path, {"gsm8k_cot": {
        "alias": "gsm8k_cot", "sample_len": 30, "exact_match,strict-match": 0.4,
        "exact_match_stderr,strict-match": 0.09, "exact_match,flexible-extract": 0.5,
        "exact_match_stderr,flexible-extract": "N/A"}})
    got = evals.read_lm_eval_results(out, "gsm8k_cot")
    assert got["primary"] == {"metric": "exact_match,strict-match", "value": 0.4, "stderr": 0.09,
                              "higher_is_better": True}
    assert got["samples"] == 30 and got["lm_eval"]["version"] == "0.4.13"
    assert "alias" not in got["metrics"]["gsm8k_cot"] and got["metrics"]["gsm8k_cot"]["exact_match,flexible-extract"]


def test_read_lm_eval_results_of_a_group(tmp_path):
    out = lm_eval_output(tmp_path, {"sub_a": {"acc,none": 0.5}, "sub_b": {"acc,none": 0.7}},
                         groups={"grp": {"acc,none": 0.6, "acc_stderr,none": 0.1}})
    got = evals.read_lm_eval_results(out, "grp")
    assert got["primary"]["value"] == 0.6 and got["samples"] == 60


def test_read_lm_eval_results_missing(tmp_path):
    with pytest.raises(MMError, match="wrote no results for t"):
        evals.read_lm_eval_results(tmp_path, "t")


def test_run_with_a_fake_lm_eval(mm_env, tmp_path):
    calls = []

    def runner(task, target, include, output, limit, concurrency, log, on_progress):
        calls.append((task, limit, concurrency, (include / "mm_arith.yaml").exists()))
        if task == "ifeval":
            raise KeyboardInterrupt
        on_progress(limit)
        return {"primary": {"metric": "exact_match,none", "value": 0.25, "stderr": 0.1}, "samples": limit}
    server = {"profile": "default", "url": "http://127.0.0.1:9", "endpoint": "http://127.0.0.1:9", "pid": None, "served_model_name": "smollm2",
              "model": "embedded:SmolLM2-135M-Instruct"}
    from mmlib.measure.results import ResultFile

    file = ResultFile("default", "eval", root=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        evals.run(load_profile("default"), server, ["mm_arith", "ifeval", "gpqa_main_cot_zeroshot"], "quick", 30, 4,
                  root=tmp_path, runner=runner, sampler=FakeSampler(), file=file)
    saved = json.loads(file.path.read_text())
    assert calls == [("mm_arith", 30, 4, True), ("ifeval", 30, 4, True)]
    assert saved["kind"] == "eval" and saved["complete"] is False and list(saved["tasks"]) == ["mm_arith"]
    assert saved["limit"] == 30 and saved["tasks"]["mm_arith"]["primary"]["value"] == 0.25
    assert "## Eval" in (tmp_path / "summary.md").read_text()


def test_default_concurrency(mm_env):
    assert evals.default_concurrency(load_profile("default")) == 32
    assert evals.default_concurrency(load_profile("chat")) == 16


def test_split_tasks():
    from mmlib.cli.evals import split_tasks

    assert split_tasks(()) == list(evals.DEFAULT_TASKS)
    assert split_tasks(("a,b", "c", "a")) == ["a", "b", "c"]
