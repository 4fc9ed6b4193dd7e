"""StopSwitch: the node's hand on every generation it runs, to stop them all between two decode steps.

Each model call of the worker (a batch's captions, an ``~/ask`` answer) takes a
:class:`~qvl_ros.model.decode_control.DecodeControl` from the switch for its duration
(:meth:`StopSwitch.control`). :meth:`StopSwitch.stop_all` (deactivate, cleanup, shutdown) stops
the running ones and keeps the switch off: a call that starts afterwards gets a control that is
already stopped, until :meth:`StopSwitch.allow` (activate) turns it on again. So no generation
outlives a transition by more than one decode step, whatever the order in which the worker and
the transition reach the switch.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional

from ..model.decode_control import DecodeControl

__all__ = ["StopSwitch"]


class StopSwitch:
    """Hands out DecodeControls and stops them all at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: List[DecodeControl] = []
        self._off: Optional[str] = None

    @contextmanager
    def control(self, **options: Any) -> Iterator[DecodeControl]:
        """A DecodeControl (``options``: its arguments) registered while the block runs; already
        stopped when the switch is off."""
        control = DecodeControl(**options)
        with self._lock:
            if self._off is not None:
                control.stop(self._off)
            self._running.append(control)
        try:
            yield control
        finally:
            with self._lock:
                self._running.remove(control)

    def stop_all(self, reason: str) -> int:
        """Stop every running control and turn the switch off; returns how many were running."""
        with self._lock:
            self._off = str(reason)
            running = list(self._running)
        for control in running:
            control.stop(reason)
        return len(running)

    def allow(self) -> None:
        """Turn the switch on again: new controls start unstopped."""
        with self._lock:
            self._off = None

    @property
    def off_reason(self) -> Optional[str]:
        """Why the switch is off (the reason of the last stop_all), or None while it is on."""
        with self._lock:
            return self._off

    def running(self) -> List[DecodeControl]:
        """The controls of the generations running now."""
        with self._lock:
            return list(self._running)
