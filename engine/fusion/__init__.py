"""Fusion methods: plain functions over one query's candidate pool (one module per method)."""
from ._normalize import TRANSFORMS, normalize, ordinal_ranks
from .rrf import rrf
from .weighted import WEIGHTS_FORMAT, WEIGHTS_VERSION, FusionWeights, feature_matrix, parse_feature

__all__ = ["rrf", "normalize", "ordinal_ranks", "TRANSFORMS", "FusionWeights", "feature_matrix", "parse_feature",
           "WEIGHTS_FORMAT", "WEIGHTS_VERSION"]
