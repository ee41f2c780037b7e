"""A test helper for the torchrun workers of the sequence-parallel tests: count the all-to-alls."""

from __future__ import annotations


def count_sequence_all_to_alls() -> list:
    """Record the shape of every sequence-to-heads all-to-all the split model makes from now on (one per
    self-attention call); returns the list the records go to."""
    from eflow.parallel import sequence

    calls: list = []
    to_heads = sequence.sequence_to_heads

    def counted(qkv, shard):
        calls.append(qkv.shape)
        return to_heads(qkv, shard)

    sequence.sequence_to_heads = counted
    return calls
