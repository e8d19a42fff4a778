"""The hub, through huggingface_hub (imported inside the functions, so only commands that talk to the
hub pay for it): what a pull would fetch and whether the disk has room, the pull itself with
progress (resumable, HF_TOKEN, the standard cache), a model's config.json and safetensors headers
without its weights, and the models in the cache.

HF_ENDPOINT, HF_HUB_OFFLINE and the cache location are read when called, not when imported.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmlib import paths
from mmlib.errors import MMError
from mmlib.models.cache import (
    WEIGHT_PATTERNS,
    complete_snapshot,
    hf_hub_cache,
    repo_folder,
)

GIB = 1 << 30
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files that hold weights in some format; a pull fetches the one set vLLM loads and none of the rest.
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot",
                "*.gguf", "*.ckpt", "*.tflite", "*.mlmodel", "*.npz")
# Kept free after a pull: a disk filled to the last byte breaks more than the download.
DISK_RESERVE = 1 * GIB

Progress = Callable[[int, int], None]  # (bytes done, bytes to fetch)


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / (1 << 20):.1f} MiB"


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def hub_error(e: BaseException, model: str) -> MMError:
    """One line for the user from whatever huggingface_hub raised."""
    from huggingface_hub import errors

    name = type(e).__name__
    if isinstance(e, errors.GatedRepoError):
        return MMError(f"{model} is gated on the hub (fix: accept its terms on its hub page, then export "
                       f"HF_TOKEN=<a token of that account>)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return MMError(f"no model {model} on the hub at {endpoint()} (fix: check the name; a private model "
                       f"needs HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return MMError(f"{model}: the hub has no such revision")
    if isinstance(e, errors.OfflineModeIsEnabled) or offline():
        return MMError(f"{model} is not in the cache ({hf_hub_cache()}) and HF_HUB_OFFLINE is set "
                       f"(fix: unset HF_HUB_OFFLINE to download it)")
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return MMError(f"the hub refused the token for {model} (fix: check HF_TOKEN)")
        return MMError(f"the hub answered HTTP {status} for {model}: {str(e).splitlines()[0]}")
    if isinstance(e, (OSError, ConnectionError)) or "Connect" in name or "Timeout" in name or "Network" in name:
        return MMError(f"cannot reach the hub at {endpoint()} for {model} ({name}: {str(e).splitlines()[0][:120]}) "
                       f"(fix: check the network; HF_HUB_OFFLINE=1 uses only what is cached)")
    return MMError(f"{model}: {name}: {str(e).splitlines()[0][:200] if str(e) else 'hub error'}")


# --- what a pull fetches ---------------------------------------------------------------------------
def is_weight(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_FILES)


def select_files(sizes: dict[str, int], index_shards: set[str] | None = None) -> dict[str, int]:
    """The files vLLM needs, as vLLM picks them: the shards the safetensors index names, else the
    top-level files of the first weight format present (safetensors, then bin, then pt), and every
    file that is not weights (config, tokenizer, templates). Other weight copies (original/, gguf,
    onnx) stay on the hub."""
    if index_shards:
        weights = set(index_shards) & set(sizes)
    else:
        top = [p for p in sizes if "/" not in p]
        kind = next((pat for pat in WEIGHT_PATTERNS if fnmatch.filter(top, pat)), None)
        weights = set(fnmatch.filter(top, kind)) if kind else set()
    return {p: s for p, s in sizes.items() if p in weights or not is_weight(p)}


@dataclass(frozen=True)
class Plan:
    model: str
    commit: str
    files: dict[str, int]  # path -> bytes, what the pull fetches
    missing: dict[str, int] = field(default_factory=dict)  # of those, not yet in the cache

    @property
    def total(self) -> int:
        return sum(self.files.values())

    @property
    def to_fetch(self) -> int:
        return sum(self.missing.values())


def plan(model: str) -> Plan:
    """Ask the hub which files the model has (one tree listing, sizes included) and which of the
    ones vLLM needs are not in the cache yet."""
    from huggingface_hub import hf_hub_download

    api = _api()
    try:
        commit = api.model_info(model).sha
        sizes = {f.path: int(f.size) for f in api.list_repo_tree(model, recursive=True, revision=commit)
                 if getattr(f, "size", None) is not None}
        shards = None
        if SAFETENSORS_INDEX in sizes:  # small, and part of the download anyway
            index = hf_hub_download(model, SAFETENSORS_INDEX, revision=commit, cache_dir=hf_hub_cache(),
                                    endpoint=endpoint())
            shards = set(json.loads(Path(index).read_text()).get("weight_map", {}).values())
    except MMError:
        raise
    except Exception as e:
        raise hub_error(e, model) from None
    files = select_files(sizes, shards)
    snapshot = repo_folder(model) / "snapshots" / commit
    return Plan(model, commit, files, {p: s for p, s in files.items() if not (snapshot / p).is_file()})


def free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk(p: Plan, free: int | None = None) -> None:
    """Refuse a pull the disk cannot hold (the check happens before the first byte moves)."""
    cache = hf_hub_cache()
    free = free_bytes(cache) if free is None else free
    if p.to_fetch + DISK_RESERVE > free:
        raise MMError(f"not enough disk for {p.model}: it needs {gib(p.to_fetch)} more and {cache} has "
                      f"{gib(free)} free (fix: free space, `mm models rm` a model you no longer use, or set "
                      f"HF_HOME to a bigger disk)")


def _reporting_tqdm(report: Progress, total: int) -> type:
    """A tqdm class for huggingface_hub's tqdm_class hook that draws nothing itself and hands the
    bytes done to `report`. huggingface_hub aggregates every file's bytes into its byte bars; the
    largest count among them is the progress (bars may grow their totals as files start)."""
    import threading

    from tqdm.auto import tqdm

    lock = threading.Lock()
    done = [0]

    class Reporting(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = False
            kwargs["file"] = open(os.devnull, "w")
            super().__init__(*args, **kwargs)

        def display(self, *args: Any, **kwargs: Any) -> bool:
            if self.unit == "B":
                with lock:
                    done[0] = max(done[0], int(self.n))
                    report(min(done[0], total), total)
            return True

        def close(self) -> None:
            fp = self.fp
            super().close()
            fp.close()

    return Reporting


def pull(model: str, progress: Progress | None = None, plan_: Plan | None = None) -> Path:
    """Download what vLLM needs of `model` into the hub cache (resuming partial files) and return
    the snapshot folder. A complete cached copy is returned at once when offline."""
    from huggingface_hub import snapshot_download

    if offline():
        local = complete_snapshot(model)
        if local is None:
            raise MMError(f"{model} is not in the cache ({hf_hub_cache()}) and HF_HUB_OFFLINE is set "
                          f"(fix: unset HF_HUB_OFFLINE to download it)")
        return local
    p = plan_ or plan(model)
    check_disk(p)
    tqdm_class = _reporting_tqdm(progress, p.to_fetch or 1) if progress else None
    try:
        folder = snapshot_download(model, cache_dir=hf_hub_cache(), allow_patterns=sorted(p.files),
                                   tqdm_class=tqdm_class, endpoint=endpoint())
    except Exception as e:
        raise hub_error(e, model) from None
    if progress:
        progress(p.to_fetch, p.to_fetch)
    return Path(folder)


# --- what a model is, before it is downloaded ------------------------------------------------------
@dataclass(frozen=True)
class RemoteModel:
    """config.json and the safetensors headers' parameter counts (by dtype, e.g. {"BF16": 7.6e9}),
    read from the hub by small requests (range requests for the headers)."""
    model: str
    config: dict[str, Any]
    parameter_counts: dict[str, int] | None  # None: not a safetensors repo


def remote_model(model: str, timeout: float = 10.0) -> RemoteModel:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import NotASafetensorsRepoError
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if offline():
        raise MMError(f"{model} is not on this machine and HF_HUB_OFFLINE is set")
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # the shard-parsing bar of a sharded model
    try:
        # One plain request first: a hub that is not there fails it at once, where the downloads
        # below would retry with backoff for half a minute.
        api = _api()
        commit = api.model_info(model, timeout=timeout).sha
        # config.json goes to mm's own cache: the hub cache keeps whole models only.
        path = hf_hub_download(model, "config.json", revision=commit, cache_dir=paths.cache_dir() / "hub-metadata",
                               endpoint=endpoint(), etag_timeout=timeout)
        config = json.loads(Path(path).read_text())
        try:
            counts = dict(api.get_safetensors_metadata(model, revision=commit, timeout=timeout).parameter_count)
        except NotASafetensorsRepoError:
            counts = None
    except MMError:
        raise
    except ValueError as e:
        raise MMError(f"{model}: config.json on the hub is not JSON ({e})") from None
    except Exception as e:
        raise hub_error(e, model) from None
    finally:
        if not quiet:
            enable_progress_bars()
    if not isinstance(config, dict):
        raise MMError(f"{model}: config.json on the hub is not a JSON object")
    return RemoteModel(model, config, counts)


# --- the cache --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedModel:
    model: str
    size: int
    path: Path
    complete: bool  # config.json and every weight file vLLM needs
    last_used: float


def cached_models() -> list[CachedModel]:
    """Models in the hub cache, largest first."""
    from huggingface_hub import scan_cache_dir

    cache = hf_hub_cache()
    if not cache.is_dir():
        return []
    info = scan_cache_dir(cache)
    out = [CachedModel(r.repo_id, r.size_on_disk, r.repo_path, complete_snapshot(r.repo_id) is not None,
                       r.last_accessed) for r in info.repos if r.repo_type == "model"]
    return sorted(out, key=lambda m: -m.size)


def remove(model: str) -> int:
    """Delete every revision of `model` from the hub cache; the bytes freed."""
    from huggingface_hub import scan_cache_dir

    cache = hf_hub_cache()
    info = scan_cache_dir(cache) if cache.is_dir() else None
    repo = next((r for r in info.repos if r.repo_type == "model" and r.repo_id == model), None) if info else None
    if repo is None:
        raise MMError(f"{model} is not in the cache ({cache}); `mm models` lists what is")
    strategy = info.delete_revisions(*(r.commit_hash for r in repo.revisions))
    strategy.execute()
    if repo.repo_path.exists():  # partial downloads (blobs/*.incomplete) belong to no revision
        shutil.rmtree(repo.repo_path, ignore_errors=True)
    return repo.size_on_disk
