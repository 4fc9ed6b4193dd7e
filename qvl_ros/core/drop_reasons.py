"""Why an input frame was dropped, as one of a fixed set of keys (the node's diagnostics and log
throttle, extraction's summary): pure Python, no imports beyond the standard library."""
from __future__ import annotations

import re
from typing import Any

__all__ = ["DROP_REASON_KEYS", "reason_key"]

# Keys under which invalid frames are counted and their log lines throttled: a fixed set, so
# counters and throttles stay bounded whatever the input (an attacker choosing encodings cannot
# create keys). All but the last two are qvl_ros.core.conversion.ERROR_KEYS.
DROP_REASON_KEYS = ("unsupported_encoding", "empty", "too_small", "odd_width", "too_large", "bad_step",
                    "short_data", "no_data", "unknown_format", "corrupt", "decode_failed", "frame_id_too_long",
                    "bad_stamp", "aspect_ratio", "other")
_REASON_TEXT = (  # for reasons given as text: the conversion's messages
    (re.compile(r"^unsupported encoding"), "unsupported_encoding"),
    (re.compile(r"^empty image"), "empty"),
    (re.compile(r"^image too small"), "too_small"),
    (re.compile(r"^\S+ needs an even width"), "odd_width"),
    (re.compile(r"max_input_pixels|^image too large"), "too_large"),
    (re.compile(r"^step \d+ is shorter"), "bad_step"),
    (re.compile(r"^data has \d+ bytes"), "short_data"),
    (re.compile(r"^compressed image has no data"), "no_data"),
    (re.compile(r"^(data is neither JPEG nor PNG|unsupported compressed format)"), "unknown_format"),
    (re.compile(r"^cannot decode (png|jpeg): .*(CRC|truncated|ends early|bad |invalid|expected a marker)"),
     "corrupt"),
    (re.compile(r"^cannot decode"), "decode_failed"),
    (re.compile(r"^frame_id of \d+ characters"), "frame_id_too_long"),
    (re.compile(r"^stamp out of range"), "bad_stamp"),
    (re.compile(r"aspect ratio"), "aspect_ratio"),
)


def reason_key(reason: Any) -> str:
    """One of :data:`DROP_REASON_KEYS` for an error or its text.

    An exception with a ``key`` attribute in that set (``ConversionError``) gives its key;
    otherwise the text is matched against the conversion's messages; anything else is "other".
    """
    key = getattr(reason, "key", None)
    if key in DROP_REASON_KEYS:
        return key
    text = str(reason)
    for pattern, key in _REASON_TEXT:
        if pattern.search(text):
            return key
    return "other"
