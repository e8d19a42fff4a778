"""The checks a start must pass, the same on every path that starts a server: `mm up`, `switch` and
the stack commands run them before they ask the daemon (check_named), and the daemon runs them
before it sleeps or stops anything for a start (Preflight, the scheduler's injected preflight),
whether the start came from the proxy, the page's buttons or a command. Both put checks.check_profile's
findings into words with `refusal`; a refused start raises Refused and what runs stays untouched.

The daemon's checks run in a thread (a model not on disk is looked up on the hub) and are kept per
profile value, vLLM build and whether the model is on disk. The footprint they work out is what the
scheduler's memory decisions read, so nothing on the event loop waits on the network. They also say
what each model serves (chat, speech, page images, embeddings): a request sent to an endpoint its
model does not answer gets a 400 naming the right one, and nothing is switched for it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping

from mmlib.errors import MMError, Refused
from mmlib.guard import checks, fit, rules
from mmlib.guard.rules import ERROR, WARN, Facts, Finding
from mmlib.models import cache
from mmlib.profiles.profile import Profile
from mmlib.profiles.vllm_args import ArgSpec
from mmlib.profiles.vllm_cmd import installed_vllm, resolve_model

log = logging.getLogger("mm.preflight")


# --- the verdict, one wording for the CLI and the daemon ---------------------------------------------
def refusal(name: str, found: list[Finding], force: bool = False) -> str | None:
    """What to tell the user when `found` holds errors (None: the start may go on). One error is one
    line. The CLI lists several and, with `force`, says `--force` starts anyway; the daemon's one
    line names the first and points at `mm check` for the rest."""
    errors = [f for f in found if f.severity == ERROR]
    if not errors:
        return None
    forcible = force and not all(f.rule == "profile" for f in errors)
    if len(errors) == 1:
        return errors[0].line() + (" (`--force` starts it anyway)" if forcible else "")
    if not force:
        return f"{errors[0].line()} (and {len(errors) - 1} more: `mm check {name}`)"
    lines = "\n".join(f"  {f.line()}" for f in errors)
    hint = "; `--force` starts it anyway" if forcible else ""
    return f"{name} would not start ({len(errors)} problems{hint}):\n{lines}"


def check_named(profile_name: str, own_ports: frozenset[int] = frozenset(), model: str | None = None,
                mm_pids: frozenset[int] = frozenset()) -> None:
    """`mm up`'s checks before it asks the daemon: raise MMError naming the file, key and fix when
    the profile cannot work; print warnings. `model` replaces the profile's (`mm up X --model Y`
    checks Y, not X's model)."""
    def announce(text: str) -> None:
        print(f"mm: {text}", file=sys.stderr, flush=True)

    found = checks.check([profile_name], announce=announce, own_ports=own_ports, model=model, mm_pids=mm_pids)
    for f in found:
        if f.severity == WARN:
            print(f"mm: warning: {f.line()}", file=sys.stderr)
    message = refusal(profile_name, found, force=True)
    if message:
        raise MMError(message)


# --- what a model serves -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Serves:
    """What a model answers, and the endpoint its requests go to."""
    kind: str  # "chat", "speech", "pages" (OCR: chat with an image), "embeddings"
    endpoint: str


CHAT = Serves("chat", "/v1/chat/completions")
SPEECH = Serves("speech", "/v1/audio/transcriptions")
PAGES = Serves("pages", "/v1/chat/completions")
EMBEDDINGS = Serves("embeddings", "/v1/embeddings")

CHAT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
IMAGE_PARTS = ("image_url", "input_image", "image")
# Words in config.json's architectures and model_type (or, not on disk, the model's name) that mark
# a model that does not chat: openai/whisper-* (WhisperForConditionalGeneration), LightOnOCR, olmOCR.
SPEECH_MARKS = ("whisper",)
PAGE_MARKS = ("ocr",)
# vLLM's [engine] keys that make a pooling (embedding, scoring) server instead of a generating one.
POOLING_ENGINE = {"runner": ("pooling",), "convert": ("embed", "classify", "reward"),
                  "task": ("embed", "embedding", "classify", "score", "reward")}


def serves(p: Profile, config: Mapping[str, Any] | None) -> Serves:
    """What the profile's server answers, from its [engine] keys and the model's config.json."""
    if any(str(p.engine.get(key, "")).lower() in values for key, values in POOLING_ENGINE.items()):
        return EMBEDDINGS
    if config:
        marks = " ".join([*map(str, config.get("architectures") or []), str(config.get("model_type", ""))])
    else:
        marks = p.model or ""
    marks = marks.lower()
    if any(m in marks for m in SPEECH_MARKS):
        return SPEECH
    return PAGES if any(m in marks for m in PAGE_MARKS) else CHAT


def has_image(doc: Mapping[str, Any] | None) -> bool:
    """Whether a chat (or Responses API) request carries an image in one of its turns."""
    turns = (doc.get("messages") or doc.get("input")) if isinstance(doc, Mapping) else None
    for turn in turns if isinstance(turns, list) else []:
        parts = turn.get("content") if isinstance(turn, Mapping) else None
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, Mapping) and part.get("type") in IMAGE_PARTS:
                return True
    return False


def misdirected(what: Serves, model: str, path: str, doc: Mapping[str, Any] | None) -> str | None:
    """One line for a request its model cannot answer at `path`, naming the endpoint that would."""
    if what == SPEECH and path in (*CHAT_PATHS, EMBEDDINGS.endpoint):
        return f"{model} transcribes speech: send audio to {SPEECH.endpoint} (it does not answer {path})"
    if what == EMBEDDINGS and path in (*CHAT_PATHS, *AUDIO_PATHS):
        return f"{model} is an embedding model: it answers {EMBEDDINGS.endpoint}, not {path}"
    if what != SPEECH and path in AUDIO_PATHS:
        return f"{model} does not transcribe speech: {path} needs a speech model (such as Whisper)"
    if what != EMBEDDINGS and path == EMBEDDINGS.endpoint:
        return (f"{model} is a chat model and does not answer {path}: embeddings need a profile with "
                f'engine.runner = "pooling" and an embedding model')
    if what == PAGES and path in CHAT_PATHS and not has_image(doc):
        return f"{model} reads page images: send one as an image_url part of a {PAGES.endpoint} message"
    return None


# --- the daemon's preflight ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    profile: Profile
    key: tuple  # (vLLM build, model on disk): a change checks again
    refusal: str | None
    footprint: fit.Prediction | None
    serves: Serves


def on_disk(p: Profile) -> bool:
    if not p.model:
        return False
    model = resolve_model(p.model)
    return cache.complete_snapshot(model) is not None if cache.HUB_ID.fullmatch(model) else os.path.exists(model)


def machine(own_ports: frozenset[int]) -> Facts:
    return checks.machine_facts(own_ports=own_ports)[0]


class Preflight:
    """The scheduler's preflight in the daemon: `await preflight(profile)` raises Refused for a
    start that must not be made. `spec` is the installed vLLM's parser (asked once), `card` the card
    mm may fill, `own_ports` the ports mm's own servers hold; the checks themselves run in a thread."""

    def __init__(self, spec: Callable[[], Awaitable[ArgSpec | None]], card: Callable[[], fit.Card | None],
                 own_ports: Callable[[], frozenset[int]] = frozenset,
                 facts: Callable[[frozenset[int]], Facts] = machine):
        self._spec, self._card, self._own_ports, self._facts = spec, card, own_ports, facts
        self._verdicts: dict[str, Verdict] = {}
        self._serves: dict[str, tuple[Profile, Serves]] = {}
        self._forced: dict[str, Profile] = {}
        self._background: asyncio.Task | None = None

    async def __call__(self, profile: Profile) -> None:
        spec = await self._spec()
        try:
            verdict = await asyncio.to_thread(self.check, profile, spec, self._own_ports())
        except Exception:  # a bug in a check must not stop a start that vLLM may well make
            log.exception("%s: the checks failed; starting it unchecked", profile.name)
            return
        if verdict.refusal and self._forced.get(profile.name) != profile:
            raise Refused(verdict.refusal)

    def force(self, profile: Profile) -> None:
        """`mm up --force`: start this profile (this value of it) whatever the checks say; they still
        run, for its footprint."""
        self._forced[profile.name] = profile

    def check(self, profile: Profile, spec: ArgSpec | None, own_ports: frozenset[int] = frozenset()) -> Verdict:
        """The checks of one server profile, from what was kept where nothing changed (blocking)."""
        key = (installed_vllm(), spec.version if spec else None, on_disk(profile))
        known = self._verdicts.get(profile.name)
        if known is not None and known.profile == profile and known.key == key:
            return known
        files = checks.model_files(profile)
        card = self._card()
        found = checks.check_profile(profile, self._facts(own_ports), spec, card=card, files=files)
        verdict = Verdict(profile, key, refusal(profile.name, found), checks.footprint(profile, card, spec, files=files),
                          serves(profile, files[1]))
        if verdict.refusal:
            log.info("refused to start %s: %s", profile.name, verdict.refusal)
        if not any(f.rule == "port-in-use" for f in found):  # a port in use may be free next time
            self._verdicts[profile.name] = verdict
        self._serves[profile.name] = (profile, verdict.serves)
        return verdict

    def _known(self, profile: Profile) -> Verdict | None:
        known = self._verdicts.get(profile.name)
        return known if known is not None and known.profile == profile else None

    def footprint(self, profile: Profile) -> fit.Prediction | None:
        """The footprint the checks worked out, where they ran for this profile (never computes)."""
        known = self._known(profile)
        return known.footprint if known else None

    def serves_known(self, profile: Profile) -> Serves | None:
        known = self._serves.get(profile.name)
        return known[1] if known is not None and known[0] == profile else None

    async def serves(self, profile: Profile) -> Serves:
        """What the profile's server answers (its config.json from disk, in a thread, once)."""
        found = self.serves_known(profile)
        if found is None:
            found = await asyncio.to_thread(serves, profile, checks.model_files(profile, remote=False)[1])
            self._serves[profile.name] = (profile, found)
        return found

    def why_not(self, profile: Profile, facts: Facts) -> str | None:
        """Why the profile cannot start here, from the full checks where they ran, else from the quick
        ones (the model there to load, the machine's rules) that need no parser or hub (blocking)."""
        known = self._known(profile)
        if known is not None:
            return known.refusal
        found = [f for f in [checks.model_missing(profile)] if f] + rules.evaluate(profile, facts)
        return refusal(profile.name, found)

    async def unavailable(self, profiles: Iterable[Profile]) -> dict[str, str]:
        """Profile name -> why it cannot start here, for those that cannot."""
        profiles, ports = list(profiles), self._own_ports()

        def judge() -> dict[str, str]:
            facts = self._facts(ports)
            return {p.name: why for p in profiles if (why := self.why_not(p, facts))}
        return await asyncio.to_thread(judge)

    def check_soon(self, profiles: Iterable[Profile]) -> None:
        """The full checks of profiles not checked yet, one after another in the background."""
        todo = [p for p in profiles if self._known(p) is None]
        if todo and (self._background is None or self._background.done()):
            self._background = asyncio.ensure_future(self._check_all(todo))

    async def _check_all(self, profiles: list[Profile]) -> None:
        for p in profiles:
            try:
                await self(p)
            except Refused:
                pass
