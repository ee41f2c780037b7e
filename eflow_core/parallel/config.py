"""The [parallel] section: activation checkpointing, per-block torch.compile, FSDP2 and Ulysses sequence
parallelism (docs/scaling.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ParallelSection(BaseModel):
    """How the trainer runs the model: what it recomputes, compiles and shards; never what it computes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ac: Literal["off", "full", "selective"] = Field(
        "off",
        description="activation checkpointing: off; full = every block keeps only its input and recomputes "
        "the rest in backward; selective = every ac_every-th block does",
    )
    ac_every: int = Field(
        2, ge=2, description="with ac = selective: checkpoint blocks 0, n, 2n, ... (global block order)"
    )
    compile: bool = Field(
        False,
        description="torch.compile each block (automatic dynamic shapes: a size that varies between calls, "
        "like an objective's group size, is compiled once as symbolic)",
    )
    fsdp: bool = Field(
        False,
        description="under torchrun (world size > 1): shard weights, gradients and AdamW state with FSDP2 "
        "(per block, then the root; bf16 weights in compute under bf16, fp32 reduction); off = "
        "replicated weights and an all-reduce of the gradients",
    )
    fsdp_reshard_after_forward: bool = Field(
        False,
        description="FSDP: free each block's gathered weights after its forward and gather them again in "
        "backward (least memory; needs every rank to make the same model calls, objective fm); "
        "false = gather all weights once per step (any objective)",
    )
    sp: int = Field(
        1,
        ge=1,
        description="Ulysses sequence parallelism under torchrun: each group of sp consecutive ranks runs "
        "one batch together, each rank holding 1/sp of the tokens of every block and, around "
        "self-attention, 1/sp of the heads (two all-to-alls); sp must divide the processes and the "
        "heads; 1 = off",
    )
    timeout_minutes: float = Field(
        60.0,
        gt=0,
        description="under torchrun: how long a rank waits in a collective before the job fails; rank 0 "
        "writes previews, validates and saves while the other ranks wait in their next collective, so "
        "this must exceed the longest of those (torch's own default is 10 minutes)",
    )

    @property
    def checkpoint_every(self) -> int:
        """0: no block is checkpointed; n: blocks 0, n, 2n, ... are (1 = every block)."""
        return {"off": 0, "full": 1, "selective": self.ac_every}[self.ac]

    def checkpointed(self, index: int) -> bool:
        """Whether global block `index` (encoder, middle, decoder order) is checkpointed."""
        every = self.checkpoint_every
        return every > 0 and index % every == 0
