"""Per-block self-attention inputs and outputs of one VideoDiT forward, recorded with forward hooks.

    with AttentionRecorder(model) as rec:
        model(x_t, t, s, cond, w)
    rec.calls[i].out   # [B, M, D] output of block i's self-attention module (global block order)
    rec.calls[i].index # [B, M] raster indices of its tokens (fewer than N in token-dropped middle blocks)

The hooks sit on the attention modules themselves, so they fire under activation checkpointing, per-block
compile and FSDP alike (a checkpointed block's recomputation in backward overwrites the record with an
equal one). Used by the attention-tile search (inputs, to replay each layer with candidate masks) and by
the `attn-distill` objective (outputs, to match a student's layers to the teacher's).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from eflow.model.tokens import TokenContext


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every block in global order (encoder, middle, decoder)."""
    return [block.attn for block in (*model.encoder, *model.middle, *model.decoder)]


@dataclass
class AttentionCall:
    """One block's self-attention call: output, token indices, and (when recorded) its input and context."""

    out: Tensor  # [B, M, D]
    index: Tensor  # [B, M]
    x: Tensor | None = None  # [B, M, D] input (inputs=True)
    ctx: TokenContext | None = None  # its token context (inputs=True)


class AttentionRecorder:
    """Records every block's self-attention call of the forwards run inside the `with` (the last call of
    each block wins)."""

    def __init__(self, model: nn.Module, *, inputs: bool = False):
        self.modules = attention_modules(model)
        self.inputs = inputs
        self.calls: dict[int, AttentionCall] = {}
        self._handles: list = []

    def _hook(self, block: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x, ctx = args[0], args[1]
            self.calls[block] = AttentionCall(
                output, ctx.index, x if self.inputs else None, ctx if self.inputs else None
            )

        return hook

    def __enter__(self) -> AttentionRecorder:
        self.calls = {}
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def outputs(self) -> list[AttentionCall]:
        """The records in block order; every block must have been called."""
        missing = [i for i in range(len(self.modules)) if i not in self.calls]
        if missing:
            raise RuntimeError(f"no self-attention call was recorded for blocks {missing}")
        return [self.calls[i] for i in range(len(self.modules))]
