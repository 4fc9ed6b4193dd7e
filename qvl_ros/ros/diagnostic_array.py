"""Statuses of :class:`qvl_ros.core.diagnostics.PipelineMonitor` as a ``diagnostic_msgs/DiagnosticArray``."""
from __future__ import annotations

from typing import Sequence

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from ..core.diagnostics import Status

__all__ = ["to_diagnostic_array"]


def to_diagnostic_array(statuses: Sequence[Status], stamp=None, hardware_id: str = ""):
    """Build a ``diagnostic_msgs/DiagnosticArray`` from :meth:`PipelineMonitor.statuses`."""
    arr = DiagnosticArray()
    if stamp is not None:
        arr.header.stamp = stamp
    for level, name, message, values in statuses:
        st = DiagnosticStatus()
        st.level = bytes([level])
        st.name = name
        st.message = message
        st.hardware_id = hardware_id
        st.values = [KeyValue(key=k, value=v) for k, v in values]
        arr.status.append(st)
    return arr
