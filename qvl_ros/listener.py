"""`python -m qvl_ros.listener` and `import qvl_ros.listener`: the module lives in :mod:`qvl_ros.ros.listener`.

Importing this name gives that module itself (one module object, so attributes set on it are seen
by its own code); running it with ``-m`` runs its ``main()``.
"""
import importlib
import sys

if __name__ == "__main__":
    spin = importlib.import_module("qvl_ros.ros.spin")
    spin.catch_signals()  # before the heavy imports
    spin.exit_now(importlib.import_module("qvl_ros.ros.listener").main())
sys.modules[__name__] = importlib.import_module("qvl_ros.ros.listener")
