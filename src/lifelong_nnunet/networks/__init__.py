"""Network wrappers for architectural continual methods (one head per task, frozen parts)."""
from .multihead import SPLITS, AutoHeadNetwork, MultiHeadNetwork, head_key, mean_entropy

__all__ = ["SPLITS", "AutoHeadNetwork", "MultiHeadNetwork", "head_key", "mean_entropy"]
