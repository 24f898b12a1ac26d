"""Fusion methods: plain functions over one query's candidate pool (one module per method), the learned
model, and the resolution of which fusion a query uses."""
from ._normalize import TRANSFORMS, normalize, ordinal_ranks
from .logistic import fit_logistic, standardization, standardize
from .resolve import Fusion, learned_how, resolve_fusion, shipped_weights_files, shipped_weights_for
from .rrf import rrf
from .weighted import WEIGHTS_FORMAT, WEIGHTS_VERSION, FusionWeights, feature_matrix, parse_feature

__all__ = ["rrf", "normalize", "ordinal_ranks", "TRANSFORMS", "FusionWeights", "feature_matrix", "parse_feature",
           "WEIGHTS_FORMAT", "WEIGHTS_VERSION", "Fusion", "resolve_fusion", "learned_how", "shipped_weights_for",
           "shipped_weights_files", "fit_logistic", "standardization", "standardize"]
