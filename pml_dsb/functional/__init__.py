"""Pure, vectorised mathematics: semantic scale and class weights."""
from .semantic_scale import class_semantic_scales, padded_class_scales, semantic_scale, unnormalized_norm_limit
from .weights import class_balanced_weights, dsb_weights

__all__ = [
    "semantic_scale",
    "class_semantic_scales",
    "padded_class_scales",
    "unnormalized_norm_limit",
    "dsb_weights",
    "class_balanced_weights",
]
