"""What vLLM makes of a share of the card (predict's share form) against figures vLLM itself printed,
and the files the prediction reads."""
from __future__ import annotations

import json
import struct
from types import MappingProxyType

import pytest

from mmlib.guard import fit, modelinfo
from mmlib.guard.fit import GIB, Card, predict, sized_card
from mmlib.guard.modelinfo import Shape
from mmlib.models import cache
from mmlib.profiles.memory import MemorySpec, parse_size
from mmlib.profiles.profile import Profile, SleepSettings

# The random-weight models of /work/shared/gpu/models (config.json only; served with
# --load-format dummy), copied here so the tests need nothing outside the repository.
DUMMY_15B = {
    "architectures": ["LlamaForCausalLM"], "dtype": "bfloat16", "head_dim": 128, "hidden_size": 1536,
    "intermediate_size": 8960, "max_position_embeddings": 32768, "model_type": "llama",
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "vocab_size": 49152,
}
DUMMY_7B_AWQ = {
    "architectures": ["LlamaForCausalLM"], "dtype": "float16", "head_dim": 128, "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "model_type": "llama",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    "vocab_size": 49152,
    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                            "version": "gemm"},
}
H100_TOTAL = 81559 * 1024 * 1024  # what NVML and CUDA report for an H100 80GB HBM3
H100 = Card(H100_TOTAL, H100_TOTAL, "NVIDIA H100 80GB HBM3", host_ram=0)


def estimate(engine, cfg, card, folder=None):
    """The footprint of a profile that gives vLLM a share of `card`."""
    p = Profile(name="t", source="t.toml", model="m", engine=MappingProxyType(engine))
    return predict(p, card if isinstance(card, Card) else sized_card(card, ram=0), cfg, folder)


def within(value: float, expected: float, tolerance: float) -> bool:
    return abs(value - expected) <= tolerance * expected


# (config, engine, vLLM's "Available KV cache memory" GiB, its "GPU KV cache size" tokens, tolerance)
# vLLM 0.26.0 on an nvidia-h100-x1, --load-format dummy, 2026-11-24 (VLLM_LOGGING_LEVEL=DEBUG runs).
MEASURED = {
    "1.5b bf16, share 0.125, defaults": (
        DUMMY_15B, {"gpu_memory_utilization": 0.125}, 6.43, 240_816, 0.03),
    "1.5b bf16, share 0.125, max_model_len 4096, max_num_seqs 16": (
        DUMMY_15B, {"gpu_memory_utilization": 0.125, "max_model_len": 4096, "max_num_seqs": 16}, 6.43, 240_816, 0.03),
    "7b awq fp8-kv, share 0.125, max_model_len 16384": (
        DUMMY_7B_AWQ, {"gpu_memory_utilization": 0.125, "kv_cache_dtype": "fp8", "max_model_len": 16384},
        4.56, 170_784, 0.03),
    "7b awq fp8-kv, share 0.125, max_model_len 16384, max_num_seqs 64": (
        DUMMY_7B_AWQ, {"gpu_memory_utilization": 0.125, "kv_cache_dtype": "fp8", "max_model_len": 16384,
                       "max_num_seqs": 64}, 4.56, 170_784, 0.03),
    # The figures (an earlier H100 run), held to its 10%. The 1.5B one at share 0.125; the
    # 7B one cannot be at 0.125 (4.0 GiB of weights + 6.49 GiB KV > the 9.96 GiB budget, and vLLM
    # printed 4.56 GiB there, above): it matches a share of 0.15.
    "issue: 1.5b, share 0.125": (DUMMY_15B, {"gpu_memory_utilization": 0.125}, 6.59, 246_816, 0.10),
    "issue: 7b awq fp8-kv, max_model_len 16384 (share 0.15)": (
        DUMMY_7B_AWQ, {"gpu_memory_utilization": 0.15, "kv_cache_dtype": "fp8", "max_model_len": 16384},
        6.49, 242_912, 0.10),
}


@pytest.mark.parametrize("case", sorted(MEASURED))
def test_estimate_matches_what_vllm_printed(case):
    cfg, engine, kv_gib, tokens, tolerance = MEASURED[case]
    est = estimate(engine, cfg, H100)
    assert est.form == "share" and est.weights_from == "config.json shapes"
    assert within(est.parts["kv_cache"] / GIB, kv_gib, tolerance), est.summary()
    assert within(est.kv_tokens, tokens, tolerance), est.summary()
    assert est.starts


def test_weights_match_vllm_model_loading_figures():
    # vLLM printed "Model loading took 2.68 GiB" and "4.03 GiB"; that includes its per-token buffers.
    for cfg, loaded in ((DUMMY_15B, 2.68), (DUMMY_7B_AWQ, 4.03)):
        assert within(estimate({}, cfg, H100).parts["weights"] / GIB, loaded, 0.02)


def test_kv_bytes_per_token():
    s15, s7 = Shape.from_config(DUMMY_15B), Shape.from_config(DUMMY_7B_AWQ)
    assert s15.kv_bytes_per_token(2) == 28 * 2 * 128 * 2 * 2 == 28_672
    assert s7.kv_bytes_per_token(1) == 28 * 4 * 128 * 2 == 28_672
    mla = Shape.from_config({"hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
                             "kv_lora_rank": 512, "qk_rope_head_dim": 64})
    assert mla.kv_bytes_per_token(2) == 61 * (512 + 64) * 2


def test_shapes_of_other_configs():
    vlm = Shape.from_config({"text_config": {"hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8},
                             "torch_dtype": "bfloat16"})
    assert vlm.layers == 4 and vlm.kv_heads == 8 and vlm.head_dim == 128
    moe = Shape.from_config({"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
                             "num_key_value_heads": 4, "num_experts": 64, "moe_intermediate_size": 1024,
                             "intermediate_size": 5632, "vocab_size": 1000})
    assert moe.linear_params()[1] == 3 * 2048 * 1024 * 64
    assert Shape.from_config({"d_model": 1280, "encoder_layers": 32}) is None  # not a whole encoder-decoder
    fp8 = Shape.from_config(DUMMY_15B).served_as("fp8")
    assert fp8.quant_method == "fp8" and fp8.weight_bytes() < Shape.from_config(DUMMY_15B).weight_bytes()
    awq = Shape.from_config(DUMMY_7B_AWQ)
    assert awq.served_as("fp8") is awq  # a quantized checkpoint stays as it is


def test_a_12gb_card_and_what_would_fit():
    est = estimate({"gpu_memory_utilization": 0.85, "max_model_len": 32768, "max_num_seqs": 16}, DUMMY_7B_AWQ, 12 * GIB)
    assert est.starts and est.kv_dtype == "16-bit" and est.awake_bytes < 12 * GIB
    tight = estimate({"gpu_memory_utilization": 0.5, "max_model_len": 32768, "max_num_seqs": 16}, DUMMY_7B_AWQ,
                     12 * GIB)
    assert not tight.starts and 0 < tight.kv_tokens < 32768
    advice = dict(tight.advice)
    assert float(advice["engine.gpu_memory_utilization"]) > 0.5 and advice["engine.kv_cache_dtype"] == '"fp8"'
    none_left = estimate({"gpu_memory_utilization": 0.3}, DUMMY_7B_AWQ, 12 * GIB)
    assert none_left.parts["kv_cache"] == 0 and none_left.kv_tokens == 0 and not none_left.starts
    small = estimate({"gpu_memory_utilization": 0.9}, DUMMY_7B_AWQ, 4 * GIB)
    assert "smaller or more quantized model" in dict(small.advice)["model"]


def test_defaults_follow_vllm():
    big, small = estimate({}, DUMMY_15B, H100), estimate({}, DUMMY_15B, 12 * GIB)
    assert big.parts["activations"] > small.parts["activations"]  # 8192 batched tokens on an 80 GB card, 2048 below
    assert big.context == 32768 and big.sequences == 1024 and small.sequences == 256
    eager = estimate({"enforce_eager": True}, DUMMY_15B, H100)
    assert eager.parts["cuda_graphs"] == 0
    assert eager.parts["kv_cache"] == big.parts["kv_cache"] + fit.CUDA_GRAPHS  # vLLM's graph estimate, not taken
    assert "7.4 requests of 32,768" in estimate({"gpu_memory_utilization": 0.125}, DUMMY_15B, H100).summary()


@pytest.mark.parametrize("text,gib", [("12GiB", 12), ("12G", 12), ("12 GB", 12), ("12", 12), ("0.5T", 512),
                                      ("11264MiB", 11)])
def test_parse_size(text, gib):
    assert parse_size(text) == gib * GIB


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="12GiB"):
        parse_size("twelve")


def write_safetensors(path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = modelinfo.ST_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + int(n)]}
        offset += int(n)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_weights_from_safetensors_headers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DUMMY_15B))
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors",
                      {"a": ("BF16", [1024, 1024]), "b": ("F32", [1024])})  # fp32 is served in 16 bits
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"q": ("I32", [256, 128])})
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "q": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = modelinfo.safetensors_files(tmp_path)
    assert modelinfo.safetensors_bytes(files) == 1024 * 1024 * 2 + 1024 * 2 + 256 * 128 * 4
    est = estimate({}, DUMMY_15B, H100, folder=tmp_path)
    assert est.weights_from == "safetensors headers"
    assert est.parts["weights"] == modelinfo.safetensors_bytes(files) + fit.BUFFER_BYTES_PER_HIDDEN * 1536
    dummy = estimate({"load_format": "dummy"}, DUMMY_15B, H100, folder=tmp_path)
    assert dummy.weights_from == "config.json shapes"  # random weights of the config's size
    (tmp_path / "model-00002-of-00002.safetensors").unlink()  # an interrupted download
    assert modelinfo.safetensors_files(tmp_path) is None


def test_model_dir_finds_local_folders_and_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cache.model_dir("Qwen/Qwen2.5-7B-Instruct-AWQ") is None
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B-Instruct-AWQ"
    old, new = repo / "snapshots" / "aaa", repo / "snapshots" / "bbb"
    for snap in (old, new):
        snap.mkdir(parents=True)
        (snap / "config.json").write_text(json.dumps(DUMMY_7B_AWQ))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa\n")
    assert cache.model_dir("Qwen/Qwen2.5-7B-Instruct-AWQ") == old
    (repo / "refs" / "main").unlink()
    assert cache.model_dir("Qwen/Qwen2.5-7B-Instruct-AWQ") in (old, new)
    local = tmp_path / "mymodel"
    local.mkdir()
    assert cache.model_dir(str(local)) is None  # no config.json
    (local / "config.json").write_text("{}")
    assert cache.model_dir(str(local)) == local
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache.hf_hub_cache() == tmp_path / "hf" / "hub"


# --- room for sleepers beside a profile that fills the card (issue 20, item 5) ----------------------------
def test_sleepers_fill_keeps_room_for_the_two_largest_at_most_half_its_room():
    others = fit.Sleepers((("chat", int(0.89 * GIB)), ("ocr", int(0.91 * GIB)), ("baseline", int(1.33 * GIB)),
                           ("default", int(0.78 * GIB))))
    two = int(1.33 * GIB) + int(0.91 * GIB)
    assert others.kept_by_fill(room=8 * GIB, floor=GIB) == two
    assert others.kept_by_fill(room=3 * GIB, floor=GIB) == int(1.5 * GIB)  # the KV cache keeps half its room
    assert others.kept_by_fill(room=int(1.2 * GIB), floor=GIB) == int(0.2 * GIB)  # and one request at least
    assert others.kept_by_fill(room=GIB // 2, floor=GIB) == 0
    assert fit.Sleepers().kept_by_fill(room=8 * GIB, floor=GIB) == 0
    checkpointed = fit.Sleepers(others.residues, checkpointed=True)
    assert checkpointed.kept_by_fill(room=8 * GIB, floor=GIB) == 0 and checkpointed.fitting(0) == (4, 4)
    # (any, most): whichever two fit in 2.25 GiB (1.33 + 0.91 = 2.24), three of the smallest do too
    assert others.fitting(int(2.25 * GIB)) == (2, 2) and others.fitting(int(2.6 * GIB)) == (2, 3)
    assert others.fitting(GIB) == (0, 1) and others.without("baseline", "ocr").fitting(GIB) == (1, 1)


FILL_7B = MemorySpec(sequences=64, kv_fill=True)  # perf's [memory]: context "fit", the rest of the card


def fill_profile(memory=FILL_7B):
    return Profile(name="perf", source="perf.toml", model="m", engine=MappingProxyType({"kv_cache_dtype": "fp8"}),
                   memory=memory, sleep=SleepSettings(enabled=True))


def test_fill_leaves_room_for_sleepers_unless_the_driver_checkpoints_them():
    card = sized_card(12 * GIB, ram=0)
    others = fit.Sleepers((("chat", int(0.89 * GIB)), ("voice-stt", int(0.9 * GIB)), ("voice-llm", int(0.9 * GIB)),
                           ("ocr", int(0.91 * GIB)), ("default", int(0.78 * GIB))))
    alone = predict(fill_profile(), card, DUMMY_7B_AWQ)
    beside = predict(fill_profile(), card, DUMMY_7B_AWQ, sleepers=others)
    assert alone.awake_bytes == 12 * GIB - fit.HEADROOM and alone.kept_for_sleepers == 0
    # the two largest sleepers fit beside it awake, whichever two the scheduler kept
    assert beside.awake_bytes + int(0.91 * GIB) + int(0.9 * GIB) <= 12 * GIB - fit.HEADROOM
    assert beside.kept_for_sleepers == int(0.91 * GIB) + int(0.9 * GIB)
    assert beside.sizes.kv_cache_bytes == beside.parts["kv_cache"] < alone.parts["kv_cache"]
    assert beside.context >= 8192 and beside.full_requests >= fit.FIT_REQUESTS and beside.starts
    assert any("leaves 1.81 GiB for the 2 largest of the 5 servers" in n for n in beside.notes)
    # where the CUDA driver takes sleepers off the card, "fill" keeps today's size
    checkpointed = predict(fill_profile(), card, DUMMY_7B_AWQ, sleepers=fit.Sleepers(others.residues, True))
    assert checkpointed.parts == alone.parts and checkpointed.sizes == alone.sizes
    # a KV cache of a fixed size leaves nothing more: it already leaves what it leaves
    fixed = MemorySpec(context=8192, sequences=16)
    assert predict(fill_profile(fixed), card, DUMMY_7B_AWQ, sleepers=others) == \
        predict(fill_profile(fixed), card, DUMMY_7B_AWQ)
