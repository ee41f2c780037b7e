"""An example eflow plugin: `chunk-softmax` attention and the `frames` token-drop strategy."""

__version__ = "0.1.0"
