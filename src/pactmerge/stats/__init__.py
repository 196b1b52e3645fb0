"""Calibration statistics for the data-aware methods and filters (PAVE, RegMean, Fisher merging).

One pass of each model over N examples of its own task (:mod:`pactmerge.stats.calibrate`):

* :func:`collect_covariances` -- ``sum x x^T`` of every linear layer's input, padding masked out;
* :func:`squared_gradients` -- the diagonal empirical Fisher;
* :func:`map_names` -- live-model names onto checkpoint names (one prefix rewrite);
* the cache (:mod:`pactmerge.stats.cache`) and the per-parameter store the engine streams from
  (:class:`StatsStore`, :class:`ParamStats`, reached by a stage as ``ctx.calibration``).

The caller provides the data: one :class:`ModelData` per model.
"""

from pactmerge.stats.calibrate import Calibration, needed_kinds, plan_calibration
from pactmerge.stats.data import ModelData, collate
from pactmerge.stats.gradients import squared_gradients
from pactmerge.stats.hooks import Covariance, collect_covariances, hookable_modules
from pactmerge.stats.names import map_names
from pactmerge.stats.settings import CalibrationSettings
from pactmerge.stats.store import COVARIANCE, FISHER, KINDS, ParamStats, StatsStore

__all__ = [
    "COVARIANCE",
    "FISHER",
    "KINDS",
    "Calibration",
    "CalibrationSettings",
    "Covariance",
    "ModelData",
    "ParamStats",
    "StatsStore",
    "collate",
    "collect_covariances",
    "hookable_modules",
    "map_names",
    "needed_kinds",
    "plan_calibration",
    "squared_gradients",
]
