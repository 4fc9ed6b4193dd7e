"""The limits of an on-demand question (``~/ask``, and the actions built like it): what a request
may ask for, checked before any work is queued, with the reason of a refusal.

* the prompt: not blank, at most ``max_prompt_chars`` characters (Unicode code points, as the
  request's string holds them);
* the cameras: by name, each known and named once (at most as many as the node has); none = all;
* the answer length: at most ``max_new_tokens``; 0 asks for the default (``caption.max_new_tokens``)
  capped at that limit.

A detection request (``~/detect``, :func:`check_detect`) names classes or a free-text query within
model.grounding's bounds (at most 64 class names, each and the query at most 128 characters, none
blank, none given twice, no control character, no ``<|`` or ``|>``: the model's special-token
markers, as extraction's ``--detect``), the cameras as above, and at most ``detect.max_detections`` detections per camera (0: that
value).

Texts a client sent are never echoed whole in a refusal (a few names, each cut short).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

from ..model.grounding import MAX_CLASSES, MAX_NAME_CHARS

__all__ = ["AskLimits", "AskRefused", "DetectLimits", "check_ask", "check_cameras", "check_detect"]

_SHOWN_NAMES = 3      # names quoted in a refusal
_SHOWN_CHARS = 40     # characters of each


class AskRefused(ValueError):
    """A request beyond the limits; the text says which and why."""


@dataclass(frozen=True)
class AskLimits:
    """The node's limits for one request (read from its parameters at each request)."""

    max_new_tokens: int
    max_prompt_chars: int
    default_tokens: int


def _shown(names: Sequence[str]) -> str:
    cut = [n if len(n) <= _SHOWN_CHARS else n[:_SHOWN_CHARS] + "..." for n in names[:_SHOWN_NAMES]]
    more = f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else ""
    return ", ".join(repr(n) for n in cut) + more


def check_cameras(wanted: Sequence[str], names: Sequence[str]) -> List[int]:
    """Indices of the wanted cameras (all when none is named); AskRefused unless each is known
    and named once."""
    if not wanted:
        return list(range(len(names)))
    if len(wanted) > len(names):
        raise AskRefused(f"{len(wanted)} camera names given; this node has {len(names)} cameras: {list(names)}")
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise AskRefused(f"unknown camera(s) {_shown(unknown)}; this node has {list(names)}")
    repeated = sorted({n for n in wanted if list(wanted).count(n) > 1})
    if repeated:
        raise AskRefused(f"camera(s) named more than once: {_shown(repeated)}")
    return [list(names).index(n) for n in wanted]


def check_ask(prompt: str, cameras: Sequence[str], max_new_tokens: int, names: Sequence[str],
              limits: AskLimits) -> Tuple[List[int], int]:
    """(camera indices, token limit) of a request within ``limits``; AskRefused otherwise."""
    if len(prompt) > limits.max_prompt_chars:
        raise AskRefused(f"prompt has {len(prompt)} characters; ask.max_prompt_chars allows {limits.max_prompt_chars}")
    if not prompt.strip():
        raise AskRefused("prompt is empty")
    tokens = int(max_new_tokens)
    if tokens > limits.max_new_tokens:
        raise AskRefused(f"max_new_tokens {tokens} is above ask.max_new_tokens {limits.max_new_tokens}")
    if tokens <= 0:
        tokens = min(int(limits.default_tokens), limits.max_new_tokens)
    return check_cameras(list(cameras), names), tokens


@dataclass(frozen=True)
class DetectLimits:
    """The node's limits for one detection request (its detect.* parameters at the request)."""

    max_detections: int
    min_detections: int


def check_detect(classes: Sequence[str], query: str, cameras: Sequence[str], max_detections: int,
                 names: Sequence[str], limits: DetectLimits) -> Tuple[List[int], tuple, str, int, int]:
    """(camera indices, classes, query, max_detections, min_detections) of a request within
    ``limits``; AskRefused otherwise. ``min_detections`` is the node's, capped at the request's most."""
    classes = [str(c) for c in classes]
    if len(classes) > MAX_CLASSES:
        raise AskRefused(f"{len(classes)} classes given; at most {MAX_CLASSES}")
    long = [c for c in classes if len(c) > MAX_NAME_CHARS]
    if long:
        raise AskRefused(f"class name(s) {_shown(long)} longer than {MAX_NAME_CHARS} characters")
    if any(not c.strip() for c in classes):
        raise AskRefused("a class name is empty")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise AskRefused(f"class name(s) given more than once: {_shown(repeated)}")
    if len(query) > MAX_NAME_CHARS:
        raise AskRefused(f"query has {len(query)} characters; at most {MAX_NAME_CHARS}")
    if not classes and not query.strip():
        raise AskRefused("give classes or a query")
    for text in classes or [query]:
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise AskRefused(f"{_shown([text])} holds a control character")
        if "<|" in text or "|>" in text:
            raise AskRefused(f"{_shown([text])} holds '<|' or '|>' (the model's special-token markers)")
    most = int(max_detections)
    if most > limits.max_detections:
        raise AskRefused(f"max_detections {most} is above detect.max_detections {limits.max_detections}")
    if most <= 0:
        most = int(limits.max_detections)
    chosen = check_cameras(list(cameras), names)
    return chosen, tuple(c.strip() for c in classes), query.strip(), most, min(int(limits.min_detections), most)
