"""`python -m qvl_ros.node` and `import qvl_ros.node`: the module lives in :mod:`qvl_ros.ros.node`.

Running it with ``-m`` runs that module's ``main()`` (a documented command). Importing this name
is an old path: it warns (DeprecationWarning) and gives ``qvl_ros.ros.node`` itself.
"""
import importlib
import sys
import warnings

if __name__ == "__main__":
    spin = importlib.import_module("qvl_ros.ros.spin")
    spin.catch_signals()  # before the heavy imports
    spin.exit_now(importlib.import_module("qvl_ros.ros.node").main())
warnings.warn("qvl_ros.node is an old import path: import qvl_ros.ros.node", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("qvl_ros.ros.node")
