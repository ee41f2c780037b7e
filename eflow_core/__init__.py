"""eflow: efficient few-step video diffusion transformers (the EFlow method and its rivals).

`from eflow import Pipeline`: a trained run, called like a diffusers pipeline (docs/pipeline.md).
"""

__version__ = "0.1.0"

__all__ = ["Pipeline", "PipelineOutput", "__version__"]

_LAZY = {"Pipeline": "eflow.pipeline", "PipelineOutput": "eflow.pipeline"}  # imported on first use


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
