"""Which optimizer steps train on images: joint image-video training at a ratio, batched by shape.

A step is all-video or all-image (one-frame clips [3, 1, H, W], a T' = 1 token grid), so every batch
has one shape and objectives need no change. Step k is an image step when u_k < ratio, with u_k ~ U[0, 1)
drawn per step from the run seed; over a run the share of image steps, and so of training samples,
is `ratio` (EFlow mixes 10% images into T2V training: --image-ratio 0.1).

The draws come in fixed chunks of CHUNK steps, chunk c from a generator seeded with (seed, c), so the
kind of step k never depends on the run length (raising --steps on resume keeps the past identical),
and `count_before(k)` (how many image steps precede k) is cheap: the loader walks the image pool and
the video pool separately, each at the position given by its own count, so neither skips nor
replays clips.
"""

from __future__ import annotations

import numpy as np

CHUNK = 1024
STREAM = 0x1A6E  # keeps these draws apart from other uses of the run seed


class StepKinds:
    """Image-or-video decision per step at `ratio`, deterministic under `seed`."""

    def __init__(self, ratio: float, seed: int):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"image ratio must be in [0, 1], got {ratio}")
        self.ratio, self.seed = ratio, seed & (2**63 - 1)
        self._flags: dict[int, np.ndarray] = {}  # chunk -> bool [CHUNK]
        self._prefix: list[int] = [0]  # image steps before chunk c, for c < len

    def _chunk(self, c: int) -> np.ndarray:
        if c not in self._flags:
            rng = np.random.default_rng([self.seed, STREAM, c])
            self._flags[c] = rng.random(CHUNK) < self.ratio
        return self._flags[c]

    def is_image(self, step: int) -> bool:
        if self.ratio in (0.0, 1.0):
            return self.ratio == 1.0
        return bool(self._chunk(step // CHUNK)[step % CHUNK])

    def images_before(self, step: int) -> int:
        """Image steps among steps 0 .. step - 1."""
        if self.ratio in (0.0, 1.0):
            return step if self.ratio == 1.0 else 0
        c = step // CHUNK
        while len(self._prefix) <= c:
            done = len(self._prefix) - 1
            self._prefix.append(self._prefix[-1] + int(self._chunk(done).sum()))
        return self._prefix[c] + int(self._chunk(c)[: step % CHUNK].sum())

    def count_before(self, step: int, image: bool) -> int:
        """Steps of the given kind among steps 0 .. step - 1."""
        images = self.images_before(step)
        return images if image else step - images
