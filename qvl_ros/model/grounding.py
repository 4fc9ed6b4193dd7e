"""Open-vocabulary detection with Qwen-VL: prompts, output formats, parsing, and the way back to
the camera's pixels.

    dets = model.detect(frames, ["cup", "chair"])          # dets[b][n]: CameraDetections
    for d in dets[0][0].detections:
        d.label, d.box, d.score                             # box: (x1, y1, x2, y2) camera pixels

Each camera of each sample is asked on its own (one row of the batch per camera), so every answer
refers to one image. The two families answer in the format each was trained with:
- Qwen2.5-VL: JSON, `[{"bbox_2d": [x1, y1, x2, y2], "label": "cup"}]` (or `"point_2d": [x, y]`),
  in absolute pixels of the image the model saw, i.e. after smart_resize (or a forced `size=`);
  often inside a ```json fence.
- Qwen2-VL: `<|object_ref_start|>cup<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`,
  on a 0-1000 scale of the image's width and height (boxes only).
Coordinates are continuous image coordinates (0 = the left/top edge of the first pixel), mapped
back by the scale of the resize the processor applied (`TensorProcessor.target_size`: the
resize is a pure scale per axis), then clamped to [0, W] x [0, H]; corners are ordered.

Parsing never raises: items that are well formed are kept, the rest counted (`malformed`), and
`complete` says whether the whole answer was one well-formed answer of the format.

Constrained decoding (`constrained=True`, the default when llguidance is installed) compiles the
format into a grammar per image (labels from the class list, coordinates bounded by the model's
image size, at most `max_detections` items, fixed separators, so the answer's length is bounded)
and masks the logits at every step (constrained.GrammarGuide): every answer then parses.

Score: `score = exp(mean log-probability)` of the tokens that spell the detection (its JSON
object, or its ref + box tokens), under the model's own distribution before any grammar mask, at
temperature 1: the geometric mean of the token probabilities, in (0, 1]. `logprob` is the mean.
"""
from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass, field

import torch

from .constrained import GrammarGuide, TokenScores, require_llguidance
from .inputs import check_images

KINDS = ("box", "point")
MAX_DETECTIONS = 100  # per camera: bounds the grammar, hence the answer's length and the KV cache
MAX_CLASSES = 64
MAX_NAME_CHARS = 128  # a class name or a query
MAX_LABEL_CHARS = 32  # a free-text label's bound in a constrained answer (no escapes, no control characters)


@dataclass
class Detection:
    label: str
    box: tuple | None     # (x1, y1, x2, y2) in the camera's pixels, x1 <= x2, y1 <= y2, inside the image
    point: tuple | None   # (x, y) in the camera's pixels (Qwen2.5-VL points)
    score: float          # exp(logprob), in (0, 1]
    logprob: float        # mean log-probability of the detection's tokens


@dataclass
class CameraDetections:
    detections: list            # [Detection]
    text: str                   # the model's answer (special tokens kept)
    image_size: tuple           # (H, W) of the camera image
    model_size: tuple           # (h, w) the model saw
    complete: bool              # the whole answer is one well-formed answer of the family's format
    malformed: int = 0          # items or fragments that could not be read
    tokens: int = 0             # tokens generated for this camera, its end token included
    grammar_error: str | None = field(default=None, repr=False)  # a constrained row's matcher error


@dataclass
class Item:
    """One detection as the model wrote it: model coordinates, and its span in the answer text."""
    label: str
    box: tuple | None
    point: tuple | None
    span: tuple  # (start, end) characters


@dataclass
class Parsed:
    items: list
    complete: bool
    malformed: int


# ----------------------------------------------------------------------------- prompts
def _targets(classes_or_query) -> tuple[list | None, str | None]:
    """(class list, None) or (None, query)."""
    if isinstance(classes_or_query, str):
        q = classes_or_query.strip()
        if not q or len(q) > MAX_NAME_CHARS:
            raise ValueError(f"a detection query must have 1 to {MAX_NAME_CHARS} characters")
        return None, q
    labels = [str(c).strip() for c in classes_or_query]
    if not labels or any(not c for c in labels):
        raise ValueError("give a non-empty list of non-empty class names or a query")
    if len(labels) > MAX_CLASSES or any(len(c) > MAX_NAME_CHARS for c in labels):
        raise ValueError(f"at most {MAX_CLASSES} class names of at most {MAX_NAME_CHARS} characters each")
    return list(dict.fromkeys(labels)), None


def _joined(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def prompt_for(v25: bool, classes_or_query, kind: str = "box") -> str:
    """The request each family was trained to answer in its grounding format."""
    labels, query = _targets(classes_or_query)
    if v25:
        what = f"every {_joined(labels)}" if labels else query
        coords = "point" if kind == "point" else "bbox"
        return f"Locate {what} in the image, output their {coords} coordinates in JSON format."
    refs = [f"<|object_ref_start|>{t}<|object_ref_end|>" for t in (labels or [query])]
    return f"Find {_joined(refs)} in the image and output the bounding box of each."


# ----------------------------------------------------------------------------- grammars
def _json_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def grammar_for(v25: bool, classes_or_query, model_size: tuple, kind: str = "box", max_detections: int = 10,
                min_detections: int = 0) -> str:
    """The Lark grammar (llguidance dialect) of an answer for an image the model sees at `model_size`."""
    labels, _ = _targets(classes_or_query)
    lo, hi = int(min_detections), int(max_detections)
    if not 0 <= lo <= hi or not 1 <= hi <= MAX_DETECTIONS:
        raise ValueError(f"need 0 <= min_detections <= max_detections and 1 <= max_detections <= {MAX_DETECTIONS}")
    if v25:
        h, w = model_size
        xs, ys = ({"type": "integer", "minimum": 0, "maximum": int(n)} for n in (w, h))
        coords = [xs, ys, xs, ys] if kind == "box" else [xs, ys]
        key = "bbox_2d" if kind == "box" else "point_2d"
        label = {"enum": labels} if labels else {"type": "string", "pattern": f'^[^"\\\\\\x00-\\x1f]{{1,{MAX_LABEL_CHARS}}}$'}
        schema = {
            "type": "array", "minItems": lo, "maxItems": hi,
            "items": {"type": "object", "additionalProperties": False, "required": [key, "label"],
                      "properties": {key: {"type": "array", "prefixItems": coords, "items": False,
                                           "minItems": len(coords)}, "label": label}},
            "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        }
        return 'start: "```json\\n" answer "\\n```"\nanswer: %json ' + json.dumps(schema) + "\n"
    if kind != "box":
        raise ValueError("Qwen2-VL grounds boxes only; points need a Qwen2.5-VL checkpoint")
    label = " | ".join(_json_string(t) for t in labels) if labels else f"/[^<>\\x00-\\x1f\\x7f]{{1,{MAX_LABEL_CHARS}}}/"
    rest = f'("\\n" det){{{max(lo - 1, 0)},{hi - 1}}}'
    body = f"det {rest}" if lo else f"(det {rest})?"
    return (f"start: {body}\n"
            'det: <|object_ref_start|> LABEL <|object_ref_end|> <|box_start|> "(" N "," N "),(" N "," N ")" <|box_end|>\n'
            f"LABEL: {label}\n"
            "N: /[0-9]|[1-9][0-9]|[1-9][0-9][0-9]|1000/\n")


def longest_answer(v25: bool, classes_or_query, model_size: tuple, kind: str = "box", max_detections: int = 10) -> int:
    """An upper bound on the tokens of a constrained answer (every token spells at least one byte)."""
    labels, _ = _targets(classes_or_query)
    label = max(len(_json_string(t).encode()) for t in labels) if labels else 4 * MAX_LABEL_CHARS + 2
    if v25:
        h, w = model_size
        n = 4 if kind == "box" else 2
        item = len('{"bbox_2d": [], "label": }') + n * len(str(max(h, w))) + (n - 1) * 2 + label
        body = 2 + max_detections * item + (max_detections - 1) * 2
        return len("```json\n\n```") + body + 1  # + end token
    item = 4 + len("(,),(,)") + 4 * 4 + label  # 4 special tokens
    return max_detections * (item + 1) + 1


# ----------------------------------------------------------------------------- parsing
_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n?(.*?)\s*```\s*$", re.S)


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _json_item(obj, span) -> Item | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("label", None), str):
        return None
    for key, n in (("bbox_2d", 4), ("point_2d", 2)):
        v = obj.get(key)
        if isinstance(v, list) and len(v) == n:
            nums = [_number(x) for x in v]
            if None not in nums:
                return Item(obj["label"], tuple(nums) if n == 4 else None, tuple(nums) if n == 2 else None, span)
    return None


def parse_json_answer(text: str) -> Parsed:
    """Qwen2.5-VL's answer: every well-formed {"bbox_2d"|"point_2d": [...], "label": ...} object, in order."""
    items, malformed = [], 0
    dec = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            malformed += 1
            i = text.find("{", i + 1)
            continue
        item = _json_item(obj, (i, end))
        if item is None:
            malformed += 1
        else:
            items.append(item)
        i = text.find("{", end)
    m = _FENCE.match(text)
    body = m.group(1) if m else text
    try:
        whole = json.loads(body)
    except ValueError:
        whole = None
    complete = (isinstance(whole, list) and len(whole) == len(items) and malformed == 0
                and all(isinstance(x, dict) for x in whole))
    return Parsed(items, complete, malformed)


_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_REF = r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>"
_BOX = rf"<\|box_start\|>\s*\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)\s*<\|box_end\|>"
_DET = re.compile(rf"(?:{_REF}\s*)?{_BOX}", re.S)
_REF_ONLY = re.compile(_REF, re.S)
_FILLER = re.compile(r"[\s,.;]*")


def parse_ref_answer(text: str, default_label: str = "") -> Parsed:
    """Qwen2-VL's answer: every ref + box (a box without its own ref takes the previous ref's label)."""
    items, last, label = [], 0, default_label
    leftover = []
    for m in _DET.finditer(text):
        gap = text[last:m.start()]
        refs = _REF_ONLY.findall(gap)
        if refs:
            label = refs[-1]
        leftover.append(_REF_ONLY.sub("", gap))
        if m.group(1) is not None:
            label = m.group(1)
        nums = tuple(float(m.group(k)) for k in range(2, 6))
        items.append(Item(label.strip(), nums, None, m.span()))
        last = m.end()
    leftover.append(text[last:])
    malformed = text.count("<|box_start|>") - len(items)
    complete = malformed == 0 and all(_FILLER.fullmatch(g) for g in leftover) and bool(items or not text.strip())
    return Parsed(items, complete, malformed)


# ----------------------------------------------------------------------------- coordinates
def model_scale(v25: bool, image_size: tuple, model_size: tuple) -> tuple[float, float]:
    """Camera pixels per model unit along (x, y): resized pixels (Qwen2.5-VL) or 1/1000 (Qwen2-VL)."""
    (H, W), (h, w) = image_size, model_size
    return (W / w, H / h) if v25 else (W / 1000.0, H / 1000.0)


def to_camera(item: Item, v25: bool, image_size: tuple, model_size: tuple) -> tuple:
    """(box, point) of an item in camera pixels: scaled, corners ordered, clamped to the image."""
    sx, sy = model_scale(v25, image_size, model_size)
    H, W = image_size
    cx = lambda x: min(max(x * sx, 0.0), float(W))
    cy = lambda y: min(max(y * sy, 0.0), float(H))
    box = point = None
    if item.box is not None:
        x1, y1, x2, y2 = item.box
        box = (cx(min(x1, x2)), cy(min(y1, y2)), cx(max(x1, x2)), cy(max(y1, y2)))
    if item.point is not None:
        point = (cx(item.point[0]), cy(item.point[1]))
    return box, point


def to_model(box: tuple, v25: bool, image_size: tuple, model_size: tuple) -> tuple:
    """A camera-pixel box in the model's coordinates (as the model would write it, rounded)."""
    sx, sy = model_scale(v25, image_size, model_size)
    x1, y1, x2, y2 = box
    return (round(x1 / sx), round(y1 / sy), round(x2 / sx), round(y2 / sy))


# ----------------------------------------------------------------------------- token text
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2 / Qwen): printable stand-in character -> byte."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


_PIECES: dict = {}


def token_pieces(tokenizer) -> list[bytes]:
    """Per token id, the bytes it spells (special tokens: their text). Cached per tokenizer."""
    hit = _PIECES.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    dec = _byte_decoder()
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    vocab = tokenizer.get_vocab()
    pieces = [b""] * (max(vocab.values()) + 1)
    for s, i in vocab.items():
        if i in special:
            pieces[i] = special[i].encode()
        elif all(c in dec for c in s):
            pieces[i] = bytes(dec[c] for c in s)
        else:  # not a byte-level token: let the tokenizer say what it spells
            pieces[i] = tokenizer.decode([i]).encode()
    if len(_PIECES) > 8:
        _PIECES.clear()
    _PIECES[id(tokenizer)] = (tokenizer, pieces)
    return pieces


def answer_text(ids: list[int], pieces: list[bytes], drop: set) -> tuple[str, list[int]]:
    """The answer's text (special tokens kept, `drop` ids left out) and, per character, its token index."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars, owner = [], []
    for t, i in enumerate(ids):
        if i in drop:
            continue
        s = dec.decode(pieces[i] if 0 <= i < len(pieces) else b"")
        chars.append(s)
        owner += [t] * len(s)
    tail = dec.decode(b"", final=True)
    chars.append(tail)
    owner += [len(ids) - 1] * len(tail)
    return "".join(chars), owner


# ----------------------------------------------------------------------------- detect
def _frames(images) -> list[list[torch.Tensor]]:
    batch = check_images(images, [""] * len(images))
    return [[x[-1] if x.dim() == 4 else x for x in cams] for cams in batch]  # a clip: its last frame


def _per_sample(classes_or_query, B: int) -> list:
    """One target per sample: a str (query) or a list of str (classes) is shared by all samples; a
    list holding at least one list is one target per sample (each a class list or a query)."""
    if isinstance(classes_or_query, str) or not any(isinstance(t, (list, tuple)) for t in classes_or_query):
        return [classes_or_query] * B
    if len(classes_or_query) != B:
        raise ValueError(f"{len(classes_or_query)} targets (class lists or queries) for {B} samples")
    return list(classes_or_query)


def detect(model, images, classes_or_query, constrained: bool | None = None, kind: str = "box",
           max_detections: int = 10, min_detections: int = 0, max_new_tokens: int | None = None,
           size=None, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, timing: dict | None = None,
           control=None) -> list[list[CameraDetections]]:
    """Detections per sample and camera (see the module doc). `classes_or_query`: a list of class
    names or one free-text query for all samples, or a list of those, one per sample (a list holding
    at least one list is read per sample).

    `constrained`: None uses the grammar when llguidance is installed; True requires it. Without a
    grammar `max_new_tokens` defaults to 256; with one, to the longest answer the grammar allows.
    `control` (decode_control.DecodeControl): stop between decode steps (the answers are then
    parsed as far as they go) and follow the tokens."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if constrained is None:
        try:
            require_llguidance()
            constrained = True
        except ImportError:
            constrained = False
    v25 = model.cfg.is_v25
    if not v25 and kind != "box":
        raise ValueError("Qwen2-VL grounds boxes only; points need a Qwen2.5-VL checkpoint")
    frames = _frames(images)
    targets = _per_sample(classes_or_query, len(frames))
    rows, prompts, where = [], [], []
    for b, cams in enumerate(frames):
        for n, im in enumerate(cams):
            rows.append([im])
            prompts.append(prompt_for(v25, targets[b], kind))
            where.append((b, n))
    proc = model.processor
    image_sizes = [tuple(r[0].shape[-2:]) for r in rows]
    model_sizes = [proc.target_size(H, W, size) for H, W in image_sizes]
    row_targets = [targets[b] for b, _ in where]
    if max_new_tokens is None:
        max_new_tokens = 256 if not constrained else max(
            longest_answer(v25, t, s, kind, max_detections) for t, s in zip(row_targets, model_sizes))
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if constrained:
        grammars = [grammar_for(v25, t, s, kind, max_detections, min_detections)
                    for t, s in zip(row_targets, model_sizes)]
        hook = GrammarGuide(grammars, proc.tokenizer, model.cfg.vocab_size, model.eos_ids, max_new_tokens,
                            model.device)
    else:
        hook = TokenScores(len(rows), max_new_tokens, model.device)
    with torch.inference_mode():
        ids = model._run(rows, prompts, size, max_new_tokens, do_sample, temperature, top_p, generator,
                         hook=hook, control=control)[1]
    ids, logprobs = ids.cpu().tolist(), hook.logprobs.cpu()
    if timing is not None:
        timing.update(steps=getattr(hook, "steps", 0), grammar_seconds=hook.seconds)
    pieces = token_pieces(proc.tokenizer)
    out = [[None] * len(cams) for cams in frames]
    for r, (b, n) in enumerate(where):
        err = hook.errors[r] if constrained else None
        out[b][n] = _read_answer(model, ids[r], pieces, v25, row_targets[r], image_sizes[r], model_sizes[r],
                                 logprobs[r], err)
    return out


def _read_answer(model, ids: list, pieces: list, v25: bool, target, image_size: tuple, model_size: tuple,
                 logprobs=None, error=None) -> CameraDetections:
    """One row's answer (token ids, pad ids after its end) -> its CameraDetections; scores from
    `logprobs` (per token), 0 without them."""
    eos = set(model.eos_ids)
    used = next((t + 1 for t, i in enumerate(ids) if i in eos), len(ids))
    text, owner = answer_text(ids[:used], pieces, eos | {model.pad_id})
    _, query = _targets(target)
    parsed = parse_json_answer(text) if v25 else parse_ref_answer(text, query or "")
    dets = []
    for it in parsed.items:
        toks = sorted(set(owner[it.span[0]:it.span[1]]))
        box, point = to_camera(it, v25, image_size, model_size)
        if logprobs is None:
            dets.append(Detection(it.label, box, point, 0.0, 0.0))
            continue
        lp = float(logprobs[toks].mean()) if toks else 0.0
        dets.append(Detection(it.label, box, point, math.exp(lp), lp))
    return CameraDetections(dets, text, image_size, model_size, parsed.complete, parsed.malformed, used, error)


def parse_tokens(model, images, classes_or_query, ids, size=None) -> list[list[CameraDetections]]:
    """Detections parsed from token ids generated by `detect` for the same `images` and targets
    (rows in its order: per sample, per camera; e.g. the tokens so far of an answer still being
    decoded, from a DecodeControl's on_tokens): the same text, parse and mapping to camera pixels
    as `detect`. Scores are 0 (they need the answer's log-probabilities, which `detect` returns)."""
    frames = _frames(images)
    targets = _per_sample(classes_or_query, len(frames))
    ids = ids.tolist() if hasattr(ids, "tolist") else [list(r) for r in ids]
    pieces = token_pieces(model.processor.tokenizer)
    out, r = [], 0
    for b, cams in enumerate(frames):
        row = []
        for im in cams:
            image_size = tuple(im.shape[-2:])
            model_size = model.processor.target_size(*image_size, size)
            row.append(_read_answer(model, ids[r], pieces, model.cfg.is_v25, targets[b], image_size, model_size))
            r += 1
        out.append(row)
    return out
