"""Model sizes: EFlow Table 5 (B, XL, XXL, 1.5B) plus `tiny` for CPU demos and tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a VideoDiT: widths, the SPRINT encoder/middle/decoder split, attention layout."""

    dim: int  # hidden width D
    heads: int  # attention heads (head_dim = dim // heads)
    ffn_dim: int  # FFN hidden width
    encoder_blocks: int  # N_e dense blocks before token dropping
    middle_blocks: int  # N_m blocks that see only the kept tokens
    decoder_blocks: int  # N_d dense blocks after the fusion layer
    softmax_ratio: int  # K: one full softmax block after every K efficient blocks (0 = none)
    window_frames: int  # m: GLGA local window spans m latent frames (|W| = m H' W')
    patch: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) patch size
    in_channels: int = 16  # latent channels (16 for the Wan 2.1 VAE, 3 for pixels)
    num_classes: int | None = None  # class-conditional (Kinetics-700) when set
    text_dim: int | None = None  # text-conditioned (cross-attention) when set: the text encoder width
    rope_theta: float = 10000.0  # RoPE base

    @property
    def depth(self) -> int:
        """Total number of blocks."""
        return self.encoder_blocks + self.middle_blocks + self.decoder_blocks

    def is_softmax_block(self, i: int) -> bool:
        """Whether global block i (0-based) is a full softmax block: (i + 1) % (K + 1) == 0."""
        return self.softmax_ratio > 0 and (i + 1) % (self.softmax_ratio + 1) == 0

    def softmax_blocks(self) -> list[int]:
        """Global indices of the interleaved full softmax blocks."""
        return [i for i in range(self.depth) if self.is_softmax_block(i)]


PRESETS: dict[str, ModelSpec] = {
    # CPU demos and tests (0.87M params). Forward+backward+AdamW, batch 8, 2 Xeon cores: 8x16x16 pixels
    # (512 tokens) 1.8-2.3 it/s dense, 3.9-4.5 it/s at 75% drop; 8x32x32 (2048 tokens) 0.2 / 0.6 it/s.
    "tiny": ModelSpec(
        dim=96, heads=4, ffn_dim=384, encoder_blocks=1, middle_blocks=4, decoder_blocks=1,
        softmax_ratio=2, window_frames=2, in_channels=3, num_classes=8, patch=(1, 4, 4),
    ),
    # EFlow Table 5: Kinetics-700 class-conditional models (paper: 128M, 529M, 3B).
    "B": ModelSpec(
        dim=768, heads=12, ffn_dim=3072, encoder_blocks=2, middle_blocks=10, decoder_blocks=2,
        softmax_ratio=6, window_frames=4, num_classes=700,
    ),
    "XL": ModelSpec(
        dim=1152, heads=16, ffn_dim=4608, encoder_blocks=3, middle_blocks=22, decoder_blocks=3,
        softmax_ratio=8, window_frames=4, num_classes=700,
    ),
    "XXL": ModelSpec(
        dim=2304, heads=24, ffn_dim=8064, encoder_blocks=4, middle_blocks=28, decoder_blocks=4,
        softmax_ratio=8, window_frames=4, num_classes=700,
    ),
    # EFlow Table 5: the text-to-video model (T5/umT5 prompt embeddings, 4096 wide; cross-attention).
    "1.5B": ModelSpec(
        dim=1536, heads=12, ffn_dim=7680, encoder_blocks=3, middle_blocks=22, decoder_blocks=3,
        softmax_ratio=8, window_frames=6, num_classes=None, text_dim=4096,
    ),
}  # fmt: skip
