"""`mm chat`: make a model ready, then chat with it through mm's stable endpoint, streaming."""
from __future__ import annotations

import json
import sys

import click

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


def stream_reply(url: str, model: str, messages: list[dict], max_tokens: int,
                 temperature: float | None, headers: dict) -> str:
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
    if temperature is not None:
        body["temperature"] = temperature
    parts: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=httpx.Timeout(None, connect=10)) as r:
        if r.status_code != 200:
            r.read()
            raise MMError(f"the model answered HTTP {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise MMError(f"the model failed mid-answer: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content") or ""
                parts.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


@click.command("chat")
@click.argument("target", required=False)
@click.option("--once", "prompt", help="Answer this one prompt and exit (for scripts).")
@click.option("--system", default="You are a helpful assistant.", show_default=True, help="System prompt.")
@click.option("--max-tokens", default=1024, show_default=True)
@click.option("--temperature", type=float, help="Sampling temperature (default: the profile's).")
@click.option("--force", is_flag=True, help="Skip the checks that run before a start.")
def chat(target: str | None, prompt: str | None, system: str, max_tokens: int, temperature: float | None,
         force: bool) -> None:
    """Chat with TARGET (a profile, a model name mm knows, or a hub id; default: the default profile).

    The same model is at mm's endpoint for any OpenAI client while you chat."""

    profile, model = resolve_target(target)
    result = activate(profile, model, force=force, quiet=True)
    served = result["servers"][-1]["served_model_name"]
    url = result["proxy"]
    key = client_api_key()
    headers = {"authorization": f"Bearer {key}"} if key else {}
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
        stream_reply(url, served, messages, max_tokens, temperature, headers)
        return
    click.echo(f"chatting with {served} (also at {url}/v1); Ctrl-D or /exit to leave", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo(err=True)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            messages.append({"role": "assistant", "content": stream_reply(url, served, messages, max_tokens,
                                                                           temperature, headers)})
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            messages.pop()
            click.echo("\n[answer stopped]", err=True)

