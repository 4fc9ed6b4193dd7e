"""`python -m qvl_ros.demo` and `import qvl_ros.demo`: the module lives in :mod:`qvl_ros.sim.demo`.

Running it with ``-m`` runs that module's ``main()`` (a documented command). Importing this name
is an old path: it warns (DeprecationWarning) and gives ``qvl_ros.sim.demo`` itself.
"""
import importlib
import sys
import warnings

if __name__ == "__main__":
    sys.exit(importlib.import_module("qvl_ros.sim.demo").main())
warnings.warn("qvl_ros.demo is an old import path: import qvl_ros.sim.demo", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("qvl_ros.sim.demo")
