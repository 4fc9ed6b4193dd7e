"""`python -m qvl_ros.listener` and `import qvl_ros.listener`: the module lives in :mod:`qvl_ros.ros.listener`.

Running it with ``-m`` runs that module's ``main()`` (a documented command). Importing this name
is an old path: it warns (DeprecationWarning) and gives ``qvl_ros.ros.listener`` itself.
"""
import importlib
import sys
import warnings

if __name__ == "__main__":
    spin = importlib.import_module("qvl_ros.ros.spin")
    spin.catch_signals()  # before the heavy imports
    spin.exit_now(importlib.import_module("qvl_ros.ros.listener").main())
warnings.warn("qvl_ros.listener is an old import path: import qvl_ros.ros.listener", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("qvl_ros.ros.listener")
