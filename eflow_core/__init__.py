"""eflow: efficient few-step video diffusion transformers (the EFlow method and its rivals)."""

__version__ = "0.1.0"
