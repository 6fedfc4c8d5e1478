"""Stage training: ``fit`` and its configuration (methods, search, reports)."""
from pystage.train.capacity import CapacityConfig
from pystage.train.config import GROWING_METHODS, METHODS, Method, TrainConfig
from pystage.train.incremental import GrowthReport, IncrementalConfig
from pystage.train.fit import fit
from pystage.train.report import FitReport, FitResult, StageReport
from pystage.train.search import SearchConfig

__all__ = ["CapacityConfig", "GROWING_METHODS", "GrowthReport", "IncrementalConfig", "METHODS", "FitReport", "FitResult", "Method", "SearchConfig", "StageReport", "TrainConfig", "fit"]
