"""`import qvl_ros.export`: the module lives in :mod:`qvl_ros.offline.export`; this name gives that module itself."""
import importlib
import sys
import warnings

warnings.warn("qvl_ros.export is an old import path: import qvl_ros.offline.export", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("qvl_ros.offline.export")
