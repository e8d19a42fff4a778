"""`mm eval`'s logic: the local tasks, refusing log-likelihood tasks, the chat settings and lm-eval's argv."""
from __future__ import annotations

import json
import re
import types
from fractions import Fraction
from pathlib import Path

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


def test_gsm8k_format_task_has_checked_answers():
    """Every "<<calc=result>>" is recomputed here and the "#### N" line is the last result."""
    rows = [json.loads(line) for line in (evals.TASKS_DIR / "mm_gsm8k.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and len({r["question"] for r in rows}) == 50
    for r in rows:
        steps = re.findall(r"<<([^=>]+)=([^>]+)>>", r["answer"])
        assert steps, r
        for expr, value in steps:
            assert re.fullmatch(r"[0-9+\-*/ ]+", expr), expr
            assert Fraction(eval(expr)) == Fraction(value), (expr, value)  # digits and operators only (checked)
        *_, final = r["answer"].splitlines()
        assert final == f"#### {int(Fraction(steps[-1][1]))}", r


def test_gsm8k_format_task_is_gsm8k_cot_but_for_its_data(tmp_path):
    installed = pytest.importorskip("lm_eval").__file__
    theirs = yaml.safe_load((Path(installed).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml").read_text())
    ours = yaml.safe_load((evals.prepare_tasks(tmp_path) / "mm_gsm8k.yaml").read_text())
    data_keys = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "tag", "metadata"}
    assert {k: v for k, v in ours.items() if k not in data_keys} == \
        {k: v for k, v in theirs.items() if k not in data_keys}
    assert ours["dataset_kwargs"]["data_files"]["test"].endswith("/mm_gsm8k.jsonl")
    assert [f["name"] for f in ours["filter_list"]] == ["strict-match", "flexible-extract"]


def test_prepare_tasks_writes_an_absolute_data_path(tmp_path):
    include = evals.prepare_tasks(tmp_path)
    assert sorted(p.name for p in include.iterdir()) == ["mm_arith.yaml", "mm_gsm8k.yaml"]
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
    assert "max_gen_toks=1024" in model_args  # the length for tasks that set none
    assert argv[argv.index("--model") + 1] == "local-chat-completions" and "--apply_chat_template" in argv
    assert "--log_samples" in argv and argv[argv.index("--fewshot_as_multiturn") + 1].startswith("--")
    assert "--gen_kwargs" not in argv
    assert argv[argv.index("--limit") + 1] == "30" and argv[argv.index("--tasks") + 1] == "gsm8k_cot"
    assert "--limit" not in evals.lm_eval_argv("t", TARGET, tmp_path, tmp_path, None, 1)
    keyed = evals.lm_eval_argv("t", Target(**{**TARGET.__dict__, "api_key": "sk-1"}), tmp_path, tmp_path, None, 1)
    assert "auth_token=sk-1" in keyed[keyed.index("--model_args") + 1]


def lm_eval_parse(argv):
    """Our argv as the installed lm-eval's own parser reads it."""
    cli = pytest.importorskip("lm_eval._cli")
    return cli.HarnessCLI()._parser.parse_args(["run", *argv[3:]])


def test_the_installed_lm_eval_reads_the_defaults_as_meant(tmp_path, mm_env):
    s = evals.settings_for(load_profile("default"))
    args = lm_eval_parse(evals.lm_eval_argv("mm_gsm8k", TARGET, tmp_path, tmp_path, 5, 4, s))
    assert args.fewshot_as_multiturn is True and args.apply_chat_template is True and args.log_samples is True
    assert args.model_args["max_gen_toks"] == 1024 and not args.gen_kwargs and args.limit == 5


def test_the_installed_lm_eval_reads_the_overrides_as_meant(tmp_path, mm_env):
    profile = load_profile("default")
    s = evals.settings_for(profile, multiturn=False, max_gen_toks=2048, gen_kwargs='temperature=0.6,until=["x","y"]')
    args = lm_eval_parse(evals.lm_eval_argv("mm_gsm8k", TARGET, tmp_path, tmp_path, None, 4, s))
    assert args.fewshot_as_multiturn is False and args.model_args["max_gen_toks"] == 2048
    assert args.gen_kwargs == {"temperature": 0.6, "until": ["x", "y"], "max_gen_toks": 2048}
    s = evals.settings_for(profile, max_gen_toks=300, gen_kwargs='{"top_p": 0.9}')
    args = lm_eval_parse(evals.lm_eval_argv("t", TARGET, tmp_path, tmp_path, None, 4, s))
    assert args.gen_kwargs == {"top_p": 0.9, "max_gen_toks": 300}
    s = evals.settings_for(profile, gen_kwargs="max_gen_toks=64")  # a length in gen_kwargs alone: as given
    args = lm_eval_parse(evals.lm_eval_argv("t", TARGET, tmp_path, tmp_path, None, 4, s))
    assert args.gen_kwargs == {"max_gen_toks": 64} and args.model_args["max_gen_toks"] == 1024


def test_settings_are_recorded_with_their_overrides(mm_env):
    default = evals.settings_for(load_profile("default")).record()
    assert default == {"apply_chat_template": True, "fewshot_as_multiturn": True, "max_gen_toks": 1024,
                       "max_gen_toks_for": "tasks that set no length of their own", "gen_kwargs": None,
                       "overrides": []}
    changed = evals.settings_for(load_profile("default"), False, 512, "temperature=0").record()
    assert changed["fewshot_as_multiturn"] is False and changed["max_gen_toks"] == 512
    assert changed["max_gen_toks_for"] == "every task" and changed["gen_kwargs"] == "temperature=0"
    assert changed["overrides"] == ["--no-multiturn", "--max-gen-toks 512", "--gen-kwargs temperature=0"]


def test_default_length_leaves_room_for_the_prompt():
    small = types.SimpleNamespace(engine={"max_model_len": 1024})
    assert evals.default_max_gen_toks(small) == 512
    assert evals.default_max_gen_toks(types.SimpleNamespace(engine={})) == evals.CHAT_MAX_GEN_TOKS
    assert evals.default_max_gen_toks(types.SimpleNamespace(engine={"max_model_len": 32768})) == 1024


@pytest.mark.parametrize("text, message", [
    ("temperature", "expected key=value pairs"),
    ("{not json", "is not a JSON object"),
    ("[1, 2]", "expected key=value pairs"),
    ('["a"]', "expected key=value pairs"),
])
def test_bad_gen_kwargs_are_refused_in_one_line(text, message, mm_env):
    with pytest.raises(MMError, match=re.escape(message)) as e:
        evals.settings_for(load_profile("default"), gen_kwargs=text)
    assert "fix:" in str(e.value) and "\n" not in str(e.value)


def test_a_length_given_twice_is_refused(mm_env):
    with pytest.raises(MMError, match="give one"):
        evals.settings_for(load_profile("default"), max_gen_toks=100, gen_kwargs="max_tokens=50")


def test_run_task_reports_the_servers_refusal(tmp_path, monkeypatch):
    log = tmp_path / "eval.log"
    log.write_text("an earlier run: API request failed! Status code: 500, Response text: old. Retrying...\n")

    def failing_helper(argv, env, log_path, tick, what):
        with open(log_path, "a") as f:
            f.write("WARNING API request failed! Status code: 400, Response text: {\"error\": \"This model's "
                    "maximum context length is 4096 tokens\"}. Retrying...\nTraceback (most recent call last):\n")
        raise MMError(f"{what} failed (exit 1); see {log_path}: Traceback")
    monkeypatch.setattr(evals.helper, "run_helper", failing_helper)
    with pytest.raises(MMError) as e:
        evals.run_task("mm_gsm8k", TARGET, tmp_path, tmp_path / "out", 5, 1, evals.Settings(), log)
    assert str(e.value).startswith("lm-eval (mm_gsm8k) gave up: the server answered HTTP 400: ")
    assert "maximum context length is 4096" in str(e.value) and "old" not in str(e.value)


def test_run_with_a_fake_lm_eval(mm_env, tmp_path):
    calls = []

    def runner(task, target, include, output, limit, concurrency, settings, log, on_progress):
        calls.append((task, limit, concurrency, settings.max_gen_toks, (include / "mm_gsm8k.yaml").exists()))
        if task == "ifeval":
            raise KeyboardInterrupt
        on_progress(limit)
        return {"headline": {"metric": "exact_match,none", "value": 0.25, "stderr": 0.1}, "samples": limit}
    server = {"profile": "default", "url": "http://127.0.0.1:9", "endpoint": "http://127.0.0.1:9", "pid": None, "served_model_name": "smollm2",
              "model": "embedded:SmolLM2-135M-Instruct"}
    from mmlib.measure.results import ResultFile

    file = ResultFile("default", "eval", root=tmp_path)
    settings = evals.settings_for(load_profile("default"), multiturn=False)
    with pytest.raises(KeyboardInterrupt):
        evals.run(load_profile("default"), server, ["mm_arith", "ifeval", "gpqa_main_cot_zeroshot"], "quick", 30, 4,
                  root=tmp_path, runner=runner, sampler=FakeSampler(), file=file, settings=settings)
    saved = json.loads(file.path.read_text())
    assert calls == [("mm_arith", 30, 4, 1024, True), ("ifeval", 30, 4, 1024, True)]
    assert saved["kind"] == "eval" and saved["complete"] is False and list(saved["tasks"]) == ["mm_arith"]
    assert saved["limit"] == 30 and saved["tasks"]["mm_arith"]["headline"]["value"] == 0.25
    assert saved["settings"]["fewshot_as_multiturn"] is False and saved["settings"]["overrides"] == ["--no-multiturn"]
    assert "## Eval" in (tmp_path / "summary.md").read_text()


def test_default_concurrency(mm_env):
    assert evals.default_concurrency(load_profile("default")) == 32
    assert evals.default_concurrency(load_profile("chat")) == 16


def test_split_tasks():
    from mmlib.cli.evals import split_tasks

    assert split_tasks(()) == list(evals.DEFAULT_TASKS)
    assert split_tasks(("a,b", "c", "a")) == ["a", "b", "c"]


def test_print_eval_shows_both_filters_the_reason_and_two_examples(tmp_path, capsys, monkeypatch, mm_env):
    from mmlib.cli.evals import print_eval
    from mmlib.measure import lm_eval_output
    from tests.unit.test_lm_eval_output import INVALID_FORMAT_ANSWERS, recorded, rewrite

    monkeypatch.setenv("COLUMNS", "200")
    output = recorded(tmp_path, "mm_gsm8k-multiturn")
    rewrite(output, INVALID_FORMAT_ANSWERS)
    entry = {**lm_eval_output.read(output, "mm_gsm8k", "", 1024, None), "duration_s": 42.0}
    doc = {"profile": "default", "mode": "quick", "limit": 5, "gpu": "no GPU", "tasks": {"mm_gsm8k": entry},
           "settings": evals.settings_for(load_profile("default")).record(), "memory": FakeSampler().result()}
    print_eval(doc)
    text = capsys.readouterr().out
    assert "flexible-extract (headline)" in text and "0.400" in text
    assert "strict-match" in text and "0.000" in text
    assert "mm_gsm8k: headline exact_match,flexible-extract: flexible-extract reads the answer" in text
    assert "mm_gsm8k: strict-match 0.000 vs flexible-extract 0.400: strict-match scored 5 of 5 answers wrong" in text
    assert "the right answer, in a form strict-match misses" in text
    examples = [line for line in text.splitlines() if line.strip().startswith("e.g. doc")]
    assert len(examples) == 2 and "(target 7;" in examples[0] and "**7** muffins left." in text
    assert "set-up: chat template, few-shot examples as chat turns, answers up to 1024 tokens" in text
    assert "change with --no-multiturn, --max-gen-toks N, --gen-kwargs" in text


def test_token_counter_uses_the_servers_tokenizer_in_a_helper(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "the": 1, "answer": 2, "is": 3, "42": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    count = evals.token_counter(str(tmp_path))
    assert count(["the answer is 42", "", "the the"]) == [4, 0, 2]
    assert evals.token_counter(str(tmp_path), python="/no/python")(["x"]) is None  # the diagnosis then estimates
