"""Cross-batch memories that supply per-class semantic scales."""
from .semantic_scale_memory import SemanticScaleMemory

__all__ = ["SemanticScaleMemory"]
