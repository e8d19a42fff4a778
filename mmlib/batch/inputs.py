"""INPUT of `mm batch`: JSONL, one object a line with a unique `id` (a string or an integer) and
either `prompt` (a string, sent as one user message) or `messages` (chat messages); optional
`max_tokens` and `temperature` override the command's for that line. Other keys are ignored (a line
may carry its reference answer, say). Blank lines are skipped.

The input is read twice and never held: `scan` checks every line and indexes the ids before
anything is sent (a bad line at the end fails now, not after an hour), `read` yields the items
again while the run goes, so a million-line input costs its ids in memory, not its prompts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mmlib.errors import MMError, printable

ItemId = str | int


@dataclass(frozen=True, slots=True)
class Item:
    id: ItemId
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None


def parse_line(raw: bytes, where: str) -> Item | None:
    """One line's item (None for a blank line); MMError naming `where` (file:line) when it is bad."""
    if not raw.strip():
        return None
    try:
        doc = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise MMError(f"{where}: not valid JSON ({msg}) (fix: one JSON object per line)") from None
    if not isinstance(doc, dict):
        raise MMError(f"{where}: a line must be a JSON object with an \"id\" and a \"prompt\" or \"messages\"")
    if "id" not in doc:
        raise MMError(f"{where}: no \"id\" (fix: give every line a unique id, a string or an integer)")
    item_id = doc["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise MMError(f"{where}: \"id\" must be a string or an integer, not {json.dumps(item_id)[:40]}")
    prompt, messages = doc.get("prompt"), doc.get("messages")
    if (prompt is None) == (messages is None):
        raise MMError(f"{where}: give either \"prompt\" (a string) or \"messages\" (chat messages), "
                      f"{'not both' if prompt is not None else 'one of them'}")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise MMError(f"{where}: \"prompt\" must be a string (for chat turns use \"messages\")")
        messages = [{"role": "user", "content": prompt}]
    elif not (isinstance(messages, list) and messages
              and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise MMError(f"{where}: \"messages\" must be a non-empty list of objects with a \"role\" "
                      f"(e.g. [{{\"role\": \"user\", \"content\": \"...\"}}])")
    max_tokens, temperature = doc.get("max_tokens"), doc.get("temperature")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise MMError(f"{where}: \"max_tokens\" must be a whole number of at least 1")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or temperature < 0):
        raise MMError(f"{where}: \"temperature\" must be a number of at least 0")
    return Item(item_id, messages, max_tokens, None if temperature is None else float(temperature))


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise MMError(f"{path}: no such file (the input: one JSON object a line)") from None
    except IsADirectoryError:
        raise MMError(f"{path}: a folder, not a JSONL file") from None
    except OSError as e:
        raise MMError(f"{path}: cannot read it ({e.strerror})") from None
    with f:
        yield from enumerate(f, 1)


@dataclass
class InputIndex:
    """Every id of the input and the line it is on (ids keep their JSON type: "1" and 1 differ)."""
    path: Path
    lines: dict[ItemId, int]

    def __len__(self) -> int:
        return len(self.lines)


def scan(path: Path) -> InputIndex:
    """Check every line of the input; its ids. MMError (file:line) at the first bad line or repeated id."""
    index = InputIndex(path, {})
    for lineno, raw in _lines(path):
        item = parse_line(raw, f"{path}:{lineno}")
        if item is None:
            continue
        first = index.lines.setdefault(item.id, lineno)
        if first != lineno:
            raise MMError(f"{path}:{lineno}: id {printable(json.dumps(item.id))} again (first on line {first}) "
                          f"(fix: every line needs its own id)")
    if not index.lines:
        raise MMError(f"{path}: no prompts in it (one JSON object a line: {{\"id\": 1, \"prompt\": \"...\"}})")
    return index


def read(path: Path) -> Iterator[Item]:
    """The input's items in order (scan checked them first)."""
    for lineno, raw in _lines(path):
        item = parse_line(raw, f"{path}:{lineno}")
        if item is not None:
            yield item
