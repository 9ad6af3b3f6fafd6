"""Static merges as pure tensor functions: sparsify x sign consensus x weighting."""

from .methods import METHODS, MergeMethod, MergeParams, merge_tensor

__all__ = ["METHODS", "MergeMethod", "MergeParams", "merge_tensor"]
