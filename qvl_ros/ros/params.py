"""The node's parameters from the table (:mod:`qvl_ros.core.params`): declarations with
descriptors (type, range, read-only, description, rule) and the one check of every value, at
start-up and on a change."""
from __future__ import annotations

from typing import Any, List

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType,
                                SetParametersResult)
from rclpy.exceptions import InvalidParameterValueException
from rclpy.parameter import Parameter

from ..core.params import BY_NAME, PARAMS, Param, ParamError, check_values
from ..core.topics import camera_names as default_camera_names

__all__ = ["declare_parameters", "validate_changes"]

_TYPES = {"string": ParameterType.PARAMETER_STRING, "strings": ParameterType.PARAMETER_STRING_ARRAY,
          "integer": ParameterType.PARAMETER_INTEGER, "double": ParameterType.PARAMETER_DOUBLE,
          "doubles": ParameterType.PARAMETER_DOUBLE_ARRAY, "bool": ParameterType.PARAMETER_BOOL}


def descriptor(p: Param) -> ParameterDescriptor:
    """``p``'s descriptor; its bounds become integer_range / floating_point_range (rqt_reconfigure's
    sliders; rclpy refuses values outside them)."""
    d = ParameterDescriptor(name=p.name, type=_TYPES[p.type], description=p.description, read_only=p.read_only,
                            additional_constraints=p.constraints, dynamic_typing=(p.type == "double"))
    bounds = p.bounds
    if bounds is not None and p.type == "integer":
        d.integer_range = [IntegerRange(from_value=int(bounds[0]), to_value=int(bounds[1]), step=1)]
    elif bounds is not None and p.type == "double":
        d.floating_point_range = [FloatingPointRange(from_value=float(bounds[0]), to_value=float(bounds[1]),
                                                     step=0.0)]
    return d


def declare_parameters(node: Any) -> dict:
    """Declare every parameter of the table on ``node`` and check the values it starts with
    (ValueError names the parameter); returns them by name. ``camera_names``' default comes
    from ``camera_topics``."""
    values = {}
    for p in PARAMS:
        default = p.default
        if p.name == "camera_names":
            default = default_camera_names([str(t) for t in values["camera_topics"]])
        try:
            values[p.name] = _declare(node, p, default)
        except InvalidParameterValueException as exc:
            raise ValueError(f"parameter {p.name}: {exc}") from None
    return check_values(values)


def _declare(node: Any, p: Param, default: Any) -> Any:
    """Declare ``p``; an empty list default is declared by its type (rclpy would read ``[]`` as a
    byte array) and then set to an empty list of strings when nothing overrides it."""
    if p.type != "strings" or default:
        return node.declare_parameter(p.name, default, descriptor(p)).value
    value = node.declare_parameter(p.name, Parameter.Type.STRING_ARRAY, descriptor(p)).value
    if value is None:
        node.set_parameters([Parameter(p.name, Parameter.Type.STRING_ARRAY, [])])
        value = []
    return value


def validate_changes(params: List[Any]) -> SetParametersResult:
    """The on-set-parameters check: every changed value against its row of the table."""
    try:
        for p in params:
            if p.name in BY_NAME:
                BY_NAME[p.name].check(p.value)
    except ParamError as exc:
        return SetParametersResult(successful=False, reason=str(exc))
    return SetParametersResult(successful=True)
