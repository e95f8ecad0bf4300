"""Visual-token pruning: FastV and its successors, one module each, on every model family.

    from edgelmm.methods.pruning import FastV, prune
    prune(model, adapter, FastV(k=2, keep=0.25))  # then model.generate(...) as usual

or, by name, in a model spec or benchmark matrix: `methods: [fastv(k=2, keep=0.25)]`.
A new method is one module with a `Pruner` dataclass plus its line in `edgelmm.registry.METHODS`
(docs/pruning.md).
"""

from edgelmm.methods.pruning.base import Pruner, Selection, VisualTokens
from edgelmm.methods.pruning.divprune import DivPrune
from edgelmm.methods.pruning.fastv import FastV
from edgelmm.methods.pruning.random_tokens import RandomTokens
from edgelmm.methods.pruning.runtime import PruneStats, prune, pruning_of, unprune
from edgelmm.methods.pruning.uniform import Uniform
from edgelmm.methods.pruning.visionzip import VisionZip

__all__ = [
    "DivPrune", "FastV", "PruneStats", "Pruner", "RandomTokens", "Selection", "Uniform", "VisionZip", "VisualTokens",
    "prune", "pruning_of", "unprune",
]
