"""Stage training: ``fit`` and its configuration (methods, search, reports), on one engine (``engine.Engine``)."""
from pystage.train.capacity import CapacityConfig
from pystage.train.config import GROWING_METHODS, METHODS, Method, TrainConfig
from pystage.train.errors import (FitArgumentError, FitTypeError, GrowthConfigError, NonFiniteError, TrainError,
                                  UnsupportedOptionError)
from pystage.train.incremental import GrowthReport, IncrementalConfig
from pystage.train.fit import fit
from pystage.train.report import FitReport, FitResult, StageReport
from pystage.train.search import SearchConfig

__all__ = ["CapacityConfig", "FitArgumentError", "FitTypeError", "GROWING_METHODS", "GrowthConfigError",
           "GrowthReport", "IncrementalConfig", "METHODS", "FitReport", "FitResult", "Method", "NonFiniteError",
           "SearchConfig", "StageReport", "TrainConfig", "TrainError", "UnsupportedOptionError", "fit"]
