"""pystage: train CNNs larger than your memory, stage by stage."""
from pystage import data, models, pathways
from pystage.errors import PystageError, UsageError
from pystage.layers import GrowthError, LayerArgumentError, MaskedConv2d, MaskedLinear
from pystage.optim import TrainConfig
from pystage.plan import Plan, PlanError, max_batch_size, plan
from pystage.staged import Stage, StagedNet
from pystage.store import FeatureStore, StoreError, dataset_fingerprint
from pystage.train import (CapacityConfig, FitArgumentError, FitReport, FitResult, IncrementalConfig, NonFiniteError,
                           SearchConfig, TrainError, UnsupportedOptionError, fit)
from pystage.units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = ["CapacityConfig", "FeatureStore", "FitArgumentError", "FitReport", "FitResult", "GrowthError",
           "IncrementalConfig", "LayerArgumentError", "MaskedConv2d", "MaskedLinear", "NonFiniteError", "Plan",
           "PlanError", "PystageError", "SearchConfig", "Stage", "StagedNet", "StoreError", "TrainConfig",
           "TrainError", "UnsupportedOptionError", "UsageError", "__version__", "data", "dataset_fingerprint", "fit",
           "format_bytes", "max_batch_size", "models", "parse_bytes", "pathways", "plan"]
