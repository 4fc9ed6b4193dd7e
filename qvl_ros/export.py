"""`import qvl_ros.export`: the module lives in :mod:`qvl_ros.offline.export`; this name gives that module itself."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("qvl_ros.offline.export")
