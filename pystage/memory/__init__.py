"""Training memory of stages: per-layer profile, stage peaks estimated on meta tensors or measured."""
from pystage.memory.measure import PeakRSS, StageMemory
from pystage.memory.profile import LayerMemory, MemoryProfile, profile
from pystage.memory.step import HeadFactory, linear_head, pooled_head
from pystage.memory.tracker import LiveBytes

__all__ = ["HeadFactory", "LayerMemory", "LiveBytes", "MemoryProfile", "PeakRSS", "StageMemory", "linear_head",
           "pooled_head", "profile"]
