"""Stage training: ``fit`` and its configuration (methods, search, reports)."""
from pystage.train.config import METHODS, Method, TrainConfig
from pystage.train.fit import fit
from pystage.train.report import FitReport, FitResult, StageReport
from pystage.train.search import SearchConfig

__all__ = ["METHODS", "FitReport", "FitResult", "Method", "SearchConfig", "StageReport", "TrainConfig", "fit"]
