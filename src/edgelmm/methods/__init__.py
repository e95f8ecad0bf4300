"""Optimization methods: typed config objects applied to a loaded model through its adapter.

    from edgelmm.methods import apply, parse_method
    apply(model, adapter, parse_method("fastv(k=2, keep=0.25)"))

Methods live in sub-packages (pruning, quantization) and are listed by name in
`edgelmm.registry.METHODS`; see `edgelmm.methods.base` for what a method is.
"""

from edgelmm.methods.base import Method, NoMethod, apply, available_methods, parse_method

__all__ = ["Method", "NoMethod", "apply", "available_methods", "parse_method"]
