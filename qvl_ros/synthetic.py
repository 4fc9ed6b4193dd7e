"""`python -m qvl_ros.synthetic` and `import qvl_ros.synthetic`: the module lives in :mod:`qvl_ros.sim.synthetic`.

Running it with ``-m`` runs that module's ``main()`` (a documented command). Importing this name
is an old path: it warns (DeprecationWarning) and gives ``qvl_ros.sim.synthetic`` itself.
"""
import importlib
import sys
import warnings

if __name__ == "__main__":
    spin = importlib.import_module("qvl_ros.ros.spin")
    spin.catch_signals()  # before the heavy imports
    spin.exit_now(importlib.import_module("qvl_ros.sim.synthetic").main())
warnings.warn("qvl_ros.synthetic is an old import path: import qvl_ros.sim.synthetic", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("qvl_ros.sim.synthetic")
