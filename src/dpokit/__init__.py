"""dpokit: Direct Preference Optimization for Hugging Face causal language models."""

__version__ = "0.1.0"

# Heavy modules (torch, transformers) load on first use, not at `import dpokit`.
_LAZY = {"sample": ("dpokit.eval.sampling", "sample")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'dpokit' has no attribute {name!r}")
