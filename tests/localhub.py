"""A local stand-in for the Hugging Face hub, for HF_ENDPOINT: folders served in the hub's URL layout,
so huggingface_hub's real download path (tree listing, HEAD, ETag, Range, resume) runs against it.

    /api/models/ORG/NAME[/revision/REV]        model info (sha, siblings)
    /api/models/ORG/NAME/tree/REV[/PATH]       the file list with sizes (and LFS sha256)
    /ORG/NAME/resolve/REV/PATH                 HEAD and GET of a file, Range honoured

Knobs: `rate` (bytes/s) serves slowly, `cut_after` (bytes) drops the first full GET of each large
file after that many bytes (an interrupted download), `sizes` overrides the sizes the tree listing
reports, `gated` maps a repo to the token it requires. Every request is recorded in `requests`.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_MIN = 64 * 1024  # files from this size on are served as LFS files (sha256 ETags), like weights
CHUNK = 64 * 1024


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], data: bool = True) -> None:
    """A safetensors file: 8-byte header length, JSON header, then the tensors' bytes (random). With
    data=False only the header is written: enough for header reads by range requests."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "U8": 1}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if data:
            rng = hashlib.sha256(path.name.encode())
            block = b"".join(hashlib.sha256(rng.digest() + i.to_bytes(2, "little")).digest() for i in range(2048))  # 64 KiB
            while offset > 0:
                f.write(block[:min(offset, len(block))])
                offset -= min(offset, len(block))


class Repo:
    def __init__(self, repo_id: str, folder: Path):
        self.id = repo_id
        self.folder = folder
        self.files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        self.oids, self.sha256 = {}, {}
        for name, p in self.files.items():
            data = p.read_bytes()
            self.oids[name] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            if len(data) >= LFS_MIN:
                self.sha256[name] = hashlib.sha256(data).hexdigest()
        self.commit = hashlib.sha1("".join(self.oids.values()).encode() + repo_id.encode()).hexdigest()

    def etag(self, name: str) -> str:
        return self.sha256.get(name) or self.oids[name]


class LocalHub:
    def __init__(self, repos: dict[str, Path], rate: float | None = None, cut_after: int | None = None,
                 sizes: dict[tuple[str, str], int] | None = None, gated: dict[str, str] | None = None):
        self.repos = {rid: Repo(rid, Path(folder)) for rid, folder in repos.items()}
        self.rate, self.cut_after = rate, cut_after
        self.sizes = sizes or {}
        self.gated = gated or {}
        self.requests: list[dict] = []
        self._cut: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def served(self, path_end: str, method: str = "GET") -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"].endswith(path_end)]

    # --- the handler ------------------------------------------------------------------------------
    def _handler(self) -> type:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.route(head=True)

            def do_GET(self) -> None:
                self.route(head=False)

            def route(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.requests.append({"method": self.command, "path": path, "range": self.headers.get("range"),
                                         "auth": self.headers.get("authorization")})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m:
                    return self.info(m[1])
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
                if m:
                    return self.tree(m[1], m[3] or "")
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    return self.file(m[1], m[3], head)
                self.error(404, "RepoNotFound")

            def repo(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self.error(404, "RepoNotFound")
                    return None
                token = hub.gated.get(repo_id)
                if token and self.headers.get("authorization") != f"Bearer {token}":
                    self.error(401, "GatedRepo")
                    return None
                return repo

            def error(self, status: int, code: str, extra: dict | None = None) -> None:
                body = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def json(self, doc) -> None:
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def info(self, repo_id: str) -> None:
                repo = self.repo(repo_id)
                if repo:
                    self.json({"_id": repo.commit[:24], "id": repo.id, "modelId": repo.id, "sha": repo.commit,
                               "private": False, "disabled": False, "gated": bool(hub.gated.get(repo.id)),
                               "downloads": 0, "likes": 0, "tags": [], "lastModified": "2025-01-01T00:00:00.000Z",
                               "createdAt": "2025-01-01T00:00:00.000Z",
                               "siblings": [{"rfilename": n} for n in repo.files]})

            def tree(self, repo_id: str, under: str) -> None:
                repo = self.repo(repo_id)
                if not repo:
                    return
                entries = []
                for name in repo.files:
                    if under and not name.startswith(under.rstrip("/") + "/"):
                        continue
                    size = hub.sizes.get((repo_id, name), repo.files[name].stat().st_size)
                    entry = {"type": "file", "oid": repo.oids[name], "size": size, "path": name}
                    if name in repo.sha256:
                        entry["lfs"] = {"oid": repo.sha256[name], "size": size, "pointerSize": 134}
                    entries.append(entry)
                self.json(entries)

            def file(self, repo_id: str, name: str, head: bool) -> None:
                repo = self.repo(repo_id)
                if not repo:
                    return
                if name not in repo.files:
                    return self.error(404, "EntryNotFound", {"X-Repo-Commit": repo.commit})
                data = repo.files[name].read_bytes()
                size, start, end = len(data), 0, len(data) - 1
                want = self.headers.get("range")
                if want:
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", want.strip())
                    start = int(m[1])
                    end = min(int(m[2]), size - 1) if m[2] else size - 1
                    if start >= size:
                        return self.error(416, "RangeNotSatisfiable", {"Content-Range": f"bytes */{size}"})
                self.send_response(206 if want else 200)
                etag = repo.etag(name)
                self.send_header("ETag", f'"{etag}"')
                if name in repo.sha256:
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(size))
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                if want:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if head:
                    return
                self.send_body(data[start:end + 1], cut=self.cut_point(repo_id, name, want, size))

            def cut_point(self, repo_id: str, name: str, want: str | None, size: int) -> int | None:
                if hub.cut_after is None or want or size <= hub.cut_after:
                    return None
                with hub._lock:
                    if (repo_id, name) in hub._cut:
                        return None
                    hub._cut.add((repo_id, name))
                return hub.cut_after

            def send_body(self, body: bytes, cut: int | None) -> None:
                sent = 0
                limit = len(body) if cut is None else cut
                while sent < limit:
                    chunk = body[sent:min(sent + CHUNK, limit)]
                    try:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    except OSError:
                        return
                    sent += len(chunk)
                    if hub.rate:
                        time.sleep(len(chunk) / hub.rate)
                if cut is not None:
                    self.close_connection = True  # the client sees a body shorter than Content-Length

        return Handler
