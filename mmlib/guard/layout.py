"""Which layout suits a model on this machine's cards, for `mm check`: one card, a replica on each
card (data parallel, for throughput), or the model split over the fewest cards it fits (tensor
parallel, over a number of cards that divides its attention heads).

Every alternative is guard.fit's own prediction of the profile with another `gpus` and `parallel`:
one card's footprint, since a replica holds the whole model on each card and a split holds its part
on each. Nothing here reads the GPU; the caller says how many cards this machine has.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

from mmlib.guard import fit
from mmlib.guard.modelinfo import Shape
from mmlib.guard.rules import INFO, Finding
from mmlib.profiles.memory import gib
from mmlib.profiles.profile import Profile

# How far `mm check` looks for a split that fits where this machine has fewer cards: a 12 GB desktop
# is told what a machine with more cards would do.
MOST_CARDS = 8


def tensor_sizes(shape: Shape, most: int) -> list[int]:
    """The numbers of cards (2 to `most`) vLLM can split this model over."""
    return [n for n in range(2, most + 1) if shape.splits_over(n)]


def with_layout(p: Profile, gpus: int, parallel: str) -> Profile:
    """The profile on `gpus` cards laid out as `parallel` (cards picked by mm)."""
    return dataclasses.replace(p, gpus=gpus, gpu_indices=(), parallel=parallel if gpus > 1 else "")


def fits(fp: fit.Prediction) -> bool:
    return fp.starts and fp.card is not None and fp.awake_bytes <= fp.card.capacity


def fewest_split(p: Profile, shape: Shape, most: int, predict: Callable[[Profile], fit.Prediction],
                 fewer_than: int | None = None) -> tuple[int, fit.Prediction] | None:
    """The fewest cards (at most `most`, fewer than `fewer_than`) the model fits split over."""
    for n in tensor_sizes(shape, most):
        if fewer_than is not None and n >= fewer_than:
            break
        fp = predict(with_layout(p, n, "tensor"))
        if fits(fp):
            return n, fp
    return None


def findings(p: Profile, fp: fit.Prediction, cfg: Mapping[str, Any] | None, folder: Path | None,
             cards_here: int, predict: Callable[[Profile], fit.Prediction]) -> list[Finding]:
    """The layout line for `mm check`: what suits the model on a machine of `cards_here` cards,
    given its footprint `fp` as the profile lays it out. `predict`: guard.fit's prediction of a
    profile on the same card, with the same sleepers."""
    shape = Shape.from_config(cfg) if cfg else None
    if shape is None or fp.card is None or fp.form == "unknown":
        return []

    def line(message: str, key: str = "gpus") -> Finding:
        return Finding(INFO, p.source, key, message, "", "layout")

    here = f"this machine has {cards_here} card{'s' if cards_here != 1 else ''}" if cards_here else \
        "this machine has no GPU"

    def split_line(start: str, to_set: Callable[[int], str], key: str = "gpus") -> list[Finding]:
        """Where the model fits split over the fewest cards (here, or on a machine with more)."""
        split = fewest_split(p, shape, max(cards_here, MOST_CARDS), predict)
        if split is None:
            return []
        n, each = split
        if n <= cards_here:
            return [line(f"{start}; split over {n} cards it fits ({gib(each.awake_bytes)} a card): "
                         + to_set(n), key)]
        return [line(f"{start}; split over {n} cards it would fit ({gib(each.awake_bytes)} a card), but {here}: "
                     f"a multi-card layout needs a machine with {n} or more GPUs", key)]

    if p.gpus == 1:
        if not fits(fp):
            return split_line("it does not fit one card", lambda n: f'set gpus = {n} and parallel = "tensor"')
        if cards_here < 2:
            return []
        return [line(f'{here} and the model fits one: gpus = {cards_here} with parallel = "data" serves a '
                     "replica on each for throughput (without sleep mode), or each card serves another "
                     "profile awake")]
    if p.parallel == "data":
        if fits(fp):
            return []
        return split_line("data parallel holds the whole model on each card, which does not fit one",
                          lambda n: 'set parallel = "tensor"' + ("" if n == p.gpus else f" and gpus = {n}"), "parallel")
    one = predict(with_layout(p, 1, ""))
    if fits(one):
        return [line(f"the model fits one card ({gib(one.awake_bytes)}): parallel = \"data\" serves {p.gpus} "
                     "replicas, more throughput than one model split over the cards (each of its layers waits for "
                     "an all-reduce)", key="parallel")]
    fewer = fewest_split(p, shape, p.gpus, predict, fewer_than=p.gpus)
    if fewer is not None:
        n, each = fewer
        return [line(f"it fits {n} cards ({gib(each.awake_bytes)} a card): gpus = {n} leaves the others free")]
    return []
