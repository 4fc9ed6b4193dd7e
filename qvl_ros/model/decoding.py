"""The old name of :mod:`qvl_ros.model.token_steps` (the static-shape token step and its CUDA graphs)."""
import warnings

from .token_steps import *  # noqa: F401,F403
from .token_steps import CACHE_QUANTUM, DecodeState, StepRunner, batch_bucket, warmup_batch_sizes  # noqa: F401

warnings.warn("qvl_ros.model.decoding is now qvl_ros.model.token_steps", DeprecationWarning, stacklevel=2)
