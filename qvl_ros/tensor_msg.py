"""`import qvl_ros.tensor_msg`: the module lives in :mod:`qvl_ros.ros.tensor_msg`; this name gives that module itself."""
import importlib
import sys
import warnings

warnings.warn("qvl_ros.tensor_msg is an old import path: import qvl_ros.ros.tensor_msg", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("qvl_ros.ros.tensor_msg")
