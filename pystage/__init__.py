"""pystage: train CNNs larger than your memory, stage by stage."""
from pystage.layers import MaskedConv2d, MaskedLinear

__version__ = "0.1.0"

__all__ = ["MaskedConv2d", "MaskedLinear", "__version__"]
