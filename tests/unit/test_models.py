"""mmlib.models without a hub: which files a pull takes, when a cached snapshot is whole, the disk
check, error lines, and weight bytes from the hub's safetensors counts (the local count's twin)."""
from __future__ import annotations

import json

import pytest

from mmlib.errors import MMError
from mmlib.guard import fit, modelinfo
from mmlib.models import cache, hub
from tests.localhub import write_safetensors

GIB = 1 << 30


def test_a_pull_takes_the_shards_the_index_names_and_every_small_file():
    sizes = {"config.json": 700, "tokenizer.json": 9_000_000, "model.safetensors.index.json": 30_000,
             "model-00001-of-00002.safetensors": 4 * GIB, "model-00002-of-00002.safetensors": 3 * GIB,
             "consolidated.safetensors": 7 * GIB, "original/consolidated.00.pth": 7 * GIB,
             "original/params.json": 200, "pytorch_model.bin": 7 * GIB, "model.gguf": 4 * GIB}
    picked = hub.select_files(sizes, {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"})
    assert set(picked) == {"config.json", "tokenizer.json", "model.safetensors.index.json", "original/params.json",
                           "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_without_an_index_the_first_weight_format_vllm_loads():
    assert set(hub.select_files({"config.json": 1, "model.safetensors": 5, "pytorch_model.bin": 5,
                                 "original/model.safetensors": 5})) == {"config.json", "model.safetensors"}
    assert set(hub.select_files({"config.json": 1, "pytorch_model.bin": 5, "flax_model.msgpack": 5})) == \
        {"config.json", "pytorch_model.bin"}


def snapshot(tmp_path, monkeypatch, repo="org/model", commit="abc"):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(commit)
    return snap


def test_a_snapshot_is_whole_with_config_and_every_indexed_shard(tmp_path, monkeypatch):
    snap = snapshot(tmp_path, monkeypatch)
    assert cache.complete_snapshot("org/model") is None
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                  "b": "s2.safetensors"}}))
    (snap / "s1.safetensors").write_bytes(b"x")
    assert cache.complete_snapshot("org/model") is None  # an interrupted pull
    assert cache.model_dir("org/model") == snap  # config.json is there for the fit check
    (snap / "s2.safetensors").write_bytes(b"x")
    assert cache.complete_snapshot("org/model") == snap


def test_hub_ids_are_org_slash_name_and_not_local_folders(tmp_path, monkeypatch):
    assert cache.is_hub_id("Qwen/Qwen2.5-7B-Instruct-AWQ")
    for local in ("embedded:SmolLM2-135M-Instruct", "./models/x", "/abs/path", "~/m", "a/b/c", "mmlib/models"):
        assert not cache.is_hub_id(local), local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "here").mkdir(parents=True)
    assert not cache.is_hub_id("org/here")


def test_the_disk_check_names_what_is_needed_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    plan = hub.Plan("org/model", "abc", {"model.safetensors": 5 * GIB}, {"model.safetensors": 5 * GIB})
    hub.check_disk(plan, free=10 * GIB)
    with pytest.raises(MMError) as e:
        hub.check_disk(plan, free=3 * GIB)
    assert "needs 5.00 GiB more" in str(e.value) and "3.00 GiB free" in str(e.value) and "HF_HOME" in str(e.value)
    assert "\n" not in str(e.value)


def test_offline_pull_of_a_missing_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MMError, match="HF_HUB_OFFLINE is set"):
        hub.pull("org/model")
    snap = snapshot(tmp_path, monkeypatch)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"x")
    assert hub.pull("org/model") == snap


def test_hub_errors_become_one_line_with_the_fix():
    from huggingface_hub import errors

    class Response:
        status_code, headers, url, request = 404, {}, "http://hub/x", None

    gated = errors.GatedRepoError("gated", response=Response())
    assert "HF_TOKEN" in str(hub.hub_error(gated, "org/m")) and "gated" in str(hub.hub_error(gated, "org/m"))
    missing = errors.RepositoryNotFoundError("no", response=Response())
    assert "no model org/m on the hub" in str(hub.hub_error(missing, "org/m"))
    down = ConnectionRefusedError(111, "Connection refused")
    assert "cannot reach the hub" in str(hub.hub_error(down, "org/m"))


def test_weights_from_the_hubs_counts_match_the_local_header_count(tmp_path):
    tensors = {"embed": ("BF16", [300, 64]), "q": ("I32", [64, 8]), "scales": ("F16", [64]), "norm": ("F32", [64])}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    counts: dict[str, int] = {}
    for dtype, shape in tensors.values():
        n = 1
        for d in shape:
            n *= d
        counts[dtype] = counts.get(dtype, 0) + n
    assert fit.hub_weight_bytes(counts) == modelinfo.safetensors_bytes([tmp_path / "model.safetensors"])


def test_the_fit_estimate_uses_the_hubs_counts_when_there_is_no_folder():
    import types

    from mmlib.guard.modelinfo import Shape

    cfg = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "intermediate_size": 18944, "vocab_size": 152064, "torch_dtype": "bfloat16"}
    remote = types.SimpleNamespace(parameter_counts={"BF16": 7_615_616_512}, config=cfg)
    shape = Shape.from_config(cfg)
    assert fit.weights_of(shape, {}, remote) == (2 * 7_615_616_512, "the hub's safetensors headers")
    assert fit.weights_of(shape, {}, None)[1] == "config.json shapes"
