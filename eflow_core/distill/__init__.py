"""Efficient-vDiT's distillation pipeline (docs/distillation.md): a trained flow-matching teacher ->
per-layer attention-tile search -> attention distillation -> multi-step latent consistency distillation.

    eflow.distill.teacher   the teacher run: loading it frozen, refusing incompatible ones
    eflow.distill.capture   per-block self-attention inputs and outputs of a forward (forward hooks)
    eflow.distill.tiles     calibration clips and the per-layer tile-mask search under a FLOPs budget
    eflow.distill.stages    student configs, runs seeded with the teacher's weights, the three stages

Every stage is an ordinary run directory (config.json + checkpoints), so `eflow sample` and `eflow eval`
use its result; the losses are the objective plugins `mlcd` and `attn-distill`.
"""
