"""Training memory of stages: per-layer profile, stage peaks estimated on meta tensors or measured, CUDA terms."""
from pystage.memory.allocator import CachingAllocator
from pystage.memory.cap import StageCap
from pystage.memory.cuda import CudaTarget
from pystage.memory.measure import PeakRSS, StageMemory
from pystage.memory.profile import LayerMemory, MemoryProfile, ProfileError, profile
from pystage.memory.step import HeadFactory, linear_head, pooled_head
from pystage.memory.tracker import LiveBytes
from pystage.memory.workspace import ConvWorkspaces

__all__ = ["CachingAllocator", "ConvWorkspaces", "CudaTarget", "HeadFactory", "LayerMemory", "LiveBytes",
           "MemoryProfile", "PeakRSS", "ProfileError", "StageCap", "StageMemory", "linear_head", "pooled_head",
           "profile"]
