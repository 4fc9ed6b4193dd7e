"""`python -m qvl_ros.model_demo` and `import qvl_ros.model_demo`: the module lives in :mod:`qvl_ros.sim.model_demo`.

Importing this name gives that module itself (one module object, so attributes set on it are seen
by its own code); running it with ``-m`` runs its ``main()``.
"""
import importlib
import sys

if __name__ == "__main__":
    sys.exit(importlib.import_module("qvl_ros.sim.model_demo").main())
sys.modules[__name__] = importlib.import_module("qvl_ros.sim.model_demo")
