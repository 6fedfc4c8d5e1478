"""pystage: train CNNs larger than your memory, stage by stage."""
from pystage import data, models, pathways
from pystage.layers import GrowthError, MaskedConv2d, MaskedLinear
from pystage.plan import Plan, PlanError, max_batch_size, plan
from pystage.staged import Stage, StagedNet
from pystage.store import FeatureStore, StoreError, dataset_fingerprint
from pystage.train import (CapacityConfig, FitReport, FitResult, IncrementalConfig, SearchConfig, TrainConfig,
                           fit)
from pystage.units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = ["CapacityConfig", "IncrementalConfig", "pathways", "FeatureStore", "FitReport", "FitResult", "GrowthError", "MaskedConv2d", "MaskedLinear", "Plan",
           "PlanError", "SearchConfig", "Stage", "StagedNet", "StoreError", "TrainConfig", "__version__", "data",
           "dataset_fingerprint", "fit", "format_bytes", "max_batch_size", "models", "parse_bytes", "plan"]
