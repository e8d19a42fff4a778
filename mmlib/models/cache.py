"""Where a model's files are on this machine, read from disk alone (huggingface_hub is not imported:
`mm up` asks this before every start). The hub cache's layout is models--ORG--NAME/{refs,snapshots}."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mmlib.paths import PROJECT_ROOT

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Weight formats vLLM loads, in the order it prefers them (a repo with several ships one set to use).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it (HF_HUB_CACHE, HF_HOME, XDG)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def is_hub_id(model: str) -> bool:
    """ORG/NAME that is not a folder here or in the project root, where the daemon starts vLLM (a
    local path wins, as in vLLM)."""
    return bool(HUB_ID.fullmatch(model)) and not any(p.exists() for p in (Path(model), PROJECT_ROOT / model))


def repo_folder(model: str) -> Path:
    return hf_hub_cache() / f"models--{model.replace('/', '--')}"


def snapshots(model: str) -> list[Path]:
    """The repo's snapshot folders, the one `refs/main` names first, then newest first."""
    repo = repo_folder(model)
    found = sorted((p for p in (repo / "snapshots").glob("*") if p.is_dir()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    ref = repo / "refs" / "main"
    if ref.is_file():
        main = repo / "snapshots" / ref.read_text().strip()
        found = [main] + [p for p in found if p != main] if main in found else found
    return found


def model_dir(model: str) -> Path | None:
    """A local folder with the model's config.json: the path itself, or its hub cache snapshot."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local if (local / "config.json").is_file() else None
    if not HUB_ID.fullmatch(model):
        return None
    return next((s for s in snapshots(model) if (s / "config.json").is_file()), None)


def has_weights(folder: Path) -> bool:
    """config.json and a whole set of weights: every shard the safetensors index names, or any file
    of a format vLLM loads. (The hub cache links a file into a snapshot only once it is complete.)"""
    if not (folder / "config.json").is_file():
        return False
    for name in INDEXES:
        if (folder / name).is_file():
            try:
                shards = set(json.loads((folder / name).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return False
            return all((folder / s).is_file() for s in shards)
    return any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS)


def complete_snapshot(model: str) -> Path | None:
    """The cached snapshot vLLM can load without a download, or None."""
    return next((s for s in snapshots(model) if has_weights(s)), None) if HUB_ID.fullmatch(model) else None
