"""Visual-token pruning: FastV and its successors, one module each, on every model family.

    from edgelmm.methods.pruning import FastV, prune
    prune(model, adapter, FastV(k=2, keep=0.25))  # then model.generate(...) as usual

or, by name, in a model spec or benchmark matrix: `methods: [fastv(k=2, keep=0.25)]`.
How a method plugs in: docs/pruning.md.
"""

from edgelmm.methods.pruning.base import Pruner, Selection, VisualTokens
from edgelmm.methods.pruning.registry import PRUNERS, get_pruner, load_pruners, register_pruner
from edgelmm.methods.pruning.runtime import PruneStats, prune, pruning_of, unprune

load_pruners()

from edgelmm.methods.pruning.divprune import DivPrune  # noqa: E402  (registered above; re-exported)
from edgelmm.methods.pruning.fastv import FastV  # noqa: E402
from edgelmm.methods.pruning.random_tokens import RandomTokens  # noqa: E402
from edgelmm.methods.pruning.uniform import Uniform  # noqa: E402
from edgelmm.methods.pruning.visionzip import VisionZip  # noqa: E402

__all__ = [
    "PRUNERS", "DivPrune", "FastV", "PruneStats", "Pruner", "RandomTokens", "Selection", "Uniform", "VisionZip", "VisualTokens",
    "get_pruner", "load_pruners", "prune", "pruning_of", "register_pruner", "unprune",
]
