"""`mm chat`: make a model ready, then chat with it through mm's stable endpoint, streaming."""
from __future__ import annotations

import json
import sys
import threading

import click

from mmlib.cli.models_cmd import complete_profiles
from mmlib.cli.servers import activate
from mmlib.errors import MMError
from mmlib.profiles.config import client_api_key
from mmlib.profiles.profile import list_profile_names, load_all


def resolve_target(target: str | None) -> tuple[str | None, str | None]:
    """(profile, model override) for what the user typed: a profile, a served name, or a model id."""
    if target is None or target in list_profile_names():
        return target, None
    profiles, _ = load_all()
    for p in profiles:
        if target in p.names:
            return p.name, None
    if "/" in target or target.startswith(("~", ".")):
        return "chat", target  # a hub id or a local path: the chat profile's settings, this model
    known = sorted({n for p in profiles for n in (p.name, *p.names)})
    raise MMError(f"'{target}' is neither a profile nor a known model name (fix: one of {', '.join(known)}, "
                  f"or a hub id such as Qwen/Qwen2.5-7B-Instruct-AWQ)")


class Reply:
    """One streamed answer. A worker thread reads the stream and prints it; the main thread only waits,
    so a Ctrl-C is always taken at once: the answer stops (the worker closes the stream at its next
    token, and vLLM drops the request) and the conversation goes on."""

    def __init__(self, url: str, body: dict, headers: dict, out=None):
        self.url, self.body, self.headers = url, body, headers
        self.out = out or sys.stdout
        self.parts: list[str] = []
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.finished = threading.Event()

    def run(self) -> str:
        """Stream until the answer ends; Ctrl-C stops it (KeyboardInterrupt is raised once it has)."""
        worker = threading.Thread(target=self._read, daemon=True)
        worker.start()
        try:
            while not self.finished.wait(0.05):
                pass
        except KeyboardInterrupt:
            self.stopped.set()
            raise
        if self.error is not None:
            raise self.error
        self.out.write("\n")
        self.out.flush()
        return "".join(self.parts)

    def _read(self) -> None:
        import httpx

        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=self.body, headers=self.headers,
                              timeout=httpx.Timeout(None, connect=10)) as r:
                if r.status_code != 200:
                    r.read()
                    raise MMError(f"the model answered HTTP {r.status_code}: {r.text[:300]}")
                for line in r.iter_lines():
                    if self.stopped.is_set():
                        return  # leaving the block closes the stream
                    self._take(line)
        except httpx.HTTPError as e:
            self.error = MMError(f"lost mm's endpoint at {self.url} mid-answer ({type(e).__name__}: {e}); "
                                 f"`mm status` shows what runs")
        except BaseException as e:  # handed to the waiting thread
            self.error = e
        finally:
            self.finished.set()

    def _take(self, line: str) -> None:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise MMError(f"the model failed mid-answer: {chunk['error'].get('message')}")
        for choice in chunk.get("choices", []):
            text = (choice.get("delta") or {}).get("content") or ""
            self.parts.append(text)
            self.out.write(text)
            self.out.flush()


def request_body(model: str, messages: list[dict], max_tokens: int | None, temperature: float | None) -> dict:
    """Only what the user set: the profile's generation defaults (temperature, repetition penalty,
    reply length) apply to the rest, as for any client."""
    body: dict = {"model": model, "messages": messages, "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return body


def read_line(prompt: str) -> str | None:
    """A line from the user (with line editing where readline exists); None at Ctrl-D."""
    try:
        import readline  # noqa: F401  (input() gains editing and history)
    except ImportError:
        pass
    while True:
        try:
            return input(prompt)
        except EOFError:
            return None
        except KeyboardInterrupt:
            click.echo("\n(Ctrl-D or /exit leaves)", err=True)


@click.command("chat")
@click.argument("target", required=False, shell_complete=complete_profiles)
@click.option("--once", "prompt", help="Answer this one prompt and exit (for scripts).")
@click.option("--system", help="A system prompt (default: none; the model's chat template decides).")
@click.option("--max-tokens", type=int, help="Longest reply (default: the profile's).")
@click.option("--temperature", type=float, help="Sampling temperature (default: the profile's).")
@click.option("--force", is_flag=True, help="Skip the checks that run before a start.")
def chat(target: str | None, prompt: str | None, system: str | None, max_tokens: int | None,
         temperature: float | None, force: bool) -> None:
    """Chat with TARGET (a profile, a model name mm knows, or a hub id; default: the default profile).

    Ctrl-C stops an answer, Ctrl-D or /exit leaves. The same model is at mm's endpoint for any
    OpenAI client while you chat."""

    profile, model = resolve_target(target)
    result = activate(profile, model, force=force, quiet=True)
    served = result["servers"][-1]["served_model_name"]
    url = result["proxy"]
    key = client_api_key()
    headers = {"authorization": f"Bearer {key}"} if key else {}
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
        Reply(url, request_body(served, messages, max_tokens, temperature), headers).run()
        return
    click.echo(f"chatting with {served} (also at {url}/v1); Ctrl-C stops an answer, Ctrl-D or /exit leaves",
               err=True)
    while True:
        line = read_line("> ")
        if line is None:
            click.echo(err=True)
            return
        if line.strip() in ("/exit", "/quit", "/bye"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = Reply(url, request_body(served, messages, max_tokens, temperature), headers).run()
            messages.append({"role": "assistant", "content": answer})
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            messages.pop()
            click.echo("\n[answer stopped]", err=True)
