"""`python -m qvl_ros.extract` and `import qvl_ros.extract`: the module lives in :mod:`qvl_ros.offline.extract`.

Running it with ``-m`` runs that module's ``main()`` (a documented command). Importing this name
is an old path: it warns (DeprecationWarning) and gives ``qvl_ros.offline.extract`` itself.
"""
import importlib
import sys
import warnings

if __name__ == "__main__":
    sys.exit(importlib.import_module("qvl_ros.offline.extract").main())
warnings.warn("qvl_ros.extract is an old import path: import qvl_ros.offline.extract", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("qvl_ros.offline.extract")
