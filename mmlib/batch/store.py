"""OUTPUT of `mm batch`: JSONL, one line per (id, sample), only ever appended to.

Each finished request's lines go to the file in one write (so a killed process leaves whole lines:
the kernel has them), and the file is fsynced at least once a second and at the end (so a reboot
loses at most the last second, and at worst tears the last line). Opening it again for a run reads
what is there: a torn last line (or the zeros a crash can leave at the end) is cut off, and every
(id, sample) already written counts as done, so the run sends only what is missing and each
(id, sample) is in the file exactly once. Anything else that does not fit (a line mm did not write,
an id the input lacks, a sample twice) stops the run with one line, before the file is touched.

One writer at a time: the file is locked (flock) while a run has it open, so a second `mm batch`
on the same OUTPUT stops at once instead of writing the same samples again."""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mmlib.errors import MMError, printable

FIX_OTHER_OUTPUT = "fix: -o a new file, or the INPUT and options this file was written with"


def errors_path(output: Path) -> Path:
    """Where a run lists the requests that failed: OUTPUT's name with .errors.jsonl (out.jsonl -> out.errors.jsonl)."""
    return output.with_name(f"{output.stem if output.suffix else output.name}.errors.jsonl")


@dataclass
class Recovered:
    """What a run found in OUTPUT."""
    done: dict[Any, int] = field(default_factory=dict)  # id -> bit k set when sample k is in the file
    lines: int = 0
    models: set[str] = field(default_factory=set)  # the models that wrote them
    torn_bytes: int = 0  # cut off the end: a line a crash left half-written

    def done_within(self, n: int) -> int:
        """Samples 0..n-1 already written, over all ids."""
        mask = (1 << n) - 1
        return sum((bits & mask).bit_count() for bits in self.done.values())


class OutputStore:
    """OUTPUT opened for a run: recovered, locked, appended to."""

    def __init__(self, path: Path, fd: int, recovered: Recovered, created: bool = False):
        self.path, self.fd, self.recovered = path, fd, recovered
        self.created = created  # by this run: removed again if it stays empty (the run stopped before an answer)
        self.dirty = False

    @classmethod
    def open(cls, path: Path, ids: Mapping[Any, int], input_name: str = "INPUT") -> "OutputStore":
        """Open (or create) OUTPUT for appending, after checking every line against the input's ids."""
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except IsADirectoryError:
            raise MMError(f"{path}: a folder (fix: -o a file, e.g. {path}/out.jsonl)") from None
        except OSError as e:
            raise MMError(f"{path}: cannot write the output there ({e.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MMError(f"{path}: another mm batch is writing it (fix: wait for it to end, or -o another "
                              f"file)") from None
            recovered, good_end = read_done(path, fd, ids, input_name)
            size = os.fstat(fd).st_size
            if good_end < size:  # cut a torn last line off: the run appends after whole lines only
                os.ftruncate(fd, good_end)
                os.fsync(fd)
                recovered.torn_bytes = size - good_end
            if not existed:
                _fsync_dir(path.parent)  # the new file's name survives a reboot too
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, recovered, created=not existed)

    def append(self, data: bytes) -> None:
        """Whole lines, in one write."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                if self.created and os.fstat(self.fd).st_size == 0:
                    self.path.unlink(missing_ok=True)  # still locked: no other run has it open
                os.fsync(self.fd)
            finally:
                os.close(self.fd)  # lets the lock go
                self.fd = -1

    def __enter__(self) -> "OutputStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_done(path: Path, fd: int, ids: Mapping[Any, int], input_name: str) -> tuple[Recovered, int]:
    """The samples OUTPUT holds, and the offset after its last whole line. A tail that is not a whole
    line (no newline yet, or only the zeros a crash can leave) is torn; anything else that is not a
    line of this run's kind is a one-line error naming file:line."""
    rec = Recovered()
    offset = good_end = 0
    torn_at: int | None = None  # the line a torn tail starts on
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            body = line.rstrip(b"\n")
            if not line.endswith(b"\n") or (body and not body.strip(b"\0")):
                torn_at = torn_at or lineno
                continue
            if torn_at is not None:
                raise MMError(f"{path}:{torn_at}: a damaged line (zeros) before whole ones; mm batch appends "
                              f"whole lines only, so the file was changed since (fix: remove that line)")
            if not body.strip():
                good_end = offset
                continue
            _take_line(rec, body, f"{path}:{lineno}", ids, input_name)
            good_end = offset
    return rec, good_end


def _take_line(rec: Recovered, body: bytes, where: str, ids: Mapping[Any, int], input_name: str) -> None:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or "id" not in doc or "sample" not in doc:
        raise MMError(f"{where}: not a line mm batch writes (an object with \"id\" and \"sample\"); OUTPUT must "
                      f"be a file mm batch wrote ({FIX_OTHER_OUTPUT})")
    item_id, sample = doc["id"], doc["sample"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or item_id not in ids:
        raise MMError(f"{where}: id {printable(json.dumps(item_id))[:60]} is not in {input_name}: this output "
                      f"was written from another input ({FIX_OTHER_OUTPUT})")
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise MMError(f"{where}: \"sample\" must be a sample index (0, 1, ...), not {json.dumps(sample)[:40]}")
    bits = rec.done.get(item_id, 0)
    if bits >> sample & 1:
        raise MMError(f"{where}: sample {sample} of id {printable(json.dumps(item_id))} is in the file twice "
                      f"(fix: remove one of the two lines)")
    rec.done[item_id] = bits | 1 << sample
    rec.lines += 1
    model = doc.get("model")
    if isinstance(model, str):
        rec.models.add(model)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ErrorLog:
    """OUTPUT.errors.jsonl: one line per request that failed for good ({"id", "samples", "error",
    "status", "attempts"}). A run starts it afresh (what the last run failed is retried anyway) and
    creates it only when something fails."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._file: Any = None
        path.unlink(missing_ok=True)

    def add(self, item_id: Any, samples: list[int], error: str, status: int | None, attempts: int) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps({"id": item_id, "samples": samples, "error": error, "status": status,
                                     "attempts": attempts}, ensure_ascii=False) + "\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
