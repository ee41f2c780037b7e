"""Token grids for benchmarks: token counts (8k, 125000), video sizes (480p) and explicit T'xH'xW' grids.

A Wan 2.1 latent grid comes from a video through the 4x8x8 VAE (time x height x width) and 1x2x2 patches:
a H x W pixel frame gives H' x W' = H/16 x W/16 tokens, and F video frames give T' = (F - 1)/4 + 1 latent
frames. 480p (480 x 832 pixels, 81 frames) -> 21 x 30 x 52 = 32,760 tokens.

A bare token count N needs a grid; the rule (`grid_for_tokens`):
- N >= 1,560 (one 480p latent frame): keep the 480p frame, H' x W' = 30 x 52, and vary the number of
  latent frames, T' = round(N / 1560). 8k -> 5 x 30 x 52 = 7,800; 32k -> 21 x 30 x 52 = 32,760 (the
  480p grid); 125k -> 80 x 30 x 52 = 124,800.
- N < 1,560: scale all three axes of the 21 x 30 x 52 grid by s = (N / 32760)^(1/3), each rounded and at
  least 1. 256 -> 4 x 6 x 10 = 240; 512 -> 5 x 8 x 13 = 520.
The grid actually used (and its token count) is reported with every result.
"""

from __future__ import annotations

import math

from eflow.errors import ConfigError

GRID_480P = (21, 30, 52)  # 81 frames of 480 x 832 pixels
FRAME_480P_TOKENS = GRID_480P[1] * GRID_480P[2]  # 1,560
PIXELS_PER_TOKEN = 16  # 8x spatial VAE downsampling times a 2x2 patch
NAMED_SIZES = {"480p": (480, 832), "720p": (720, 1280)}  # Wan 2.1's video sizes (height, width)
_SUFFIXES = {"k": 1_000, "m": 1_000_000}


def split_list(text: str) -> list[str]:
    """ "a, b,c" -> ["a", "b", "c"] (empty items dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_token_count(text: str) -> int:
    """ "8k" -> 8000, "1.5k" -> 1500, "125000" -> 125000, "1m" -> 1000000 (k = 1,000)."""
    raw = text.strip().lower().replace("_", "")
    scale = _SUFFIXES.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(
            f"--tokens {text!r}: not a token count; use numbers like 8k, 32k, 125000 (k = 1,000)"
        ) from None
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"--tokens {text!r}: a token count must be at least 1")
    return round(value * scale)


def grid_for_tokens(tokens: int) -> tuple[int, int, int]:
    """A (T', H', W') grid of about `tokens` tokens, by the rule in the module docstring."""
    if tokens >= FRAME_480P_TOKENS:
        return (max(1, round(tokens / FRAME_480P_TOKENS)), GRID_480P[1], GRID_480P[2])
    scale = (tokens / math.prod(GRID_480P)) ** (1 / 3)
    t, h, w = (max(1, round(axis * scale)) for axis in GRID_480P)
    return (t, h, w)


def parse_grid(text: str) -> tuple[int, int, int]:
    """ "21x30x52" -> (21, 30, 52)."""
    try:
        values = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ConfigError(f"--grid {text!r}: give a latent token grid as T'xH'xW', e.g. 21x30x52")
    return values


def parse_video_size(text: str) -> tuple[int, int]:
    """ "480p" -> (480, 832), "720p" -> (720, 1280), "480x832" -> (480, 832): pixels, multiples of 16."""
    key = text.strip().lower()
    if key in NAMED_SIZES:
        return NAMED_SIZES[key]
    try:
        height, width = (int(part) for part in key.split("x"))
    except ValueError:
        raise ConfigError(
            f"--size {text!r}: give a video size as {', '.join(NAMED_SIZES)} or HxW pixels, e.g. 480x832"
        ) from None
    if min(height, width) < PIXELS_PER_TOKEN or height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
        raise ConfigError(
            f"--size {text!r}: height and width must be multiples of {PIXELS_PER_TOKEN} pixels "
            f"(8x VAE times a 2x2 patch), e.g. 480x832"
        )
    return height, width


def video_grid(latent_frames: int, size: tuple[int, int]) -> tuple[int, int, int]:
    """(T', H', W') of `latent_frames` latent frames of a (height, width) pixel video."""
    if latent_frames < 1:
        raise ConfigError(f"--frames {latent_frames}: the number of latent frames must be at least 1")
    return (latent_frames, size[0] // PIXELS_PER_TOKEN, size[1] // PIXELS_PER_TOKEN)


def format_grid(grid: tuple[int, int, int]) -> str:
    """(21, 30, 52) -> "21x30x52"."""
    return "x".join(str(axis) for axis in grid)


def sweep_grids(
    tokens: str | None, frames: str | None, size: str | None, grid: str | None
) -> list[tuple[int, int, int]]:
    """The grids of a sweep from exactly one way of naming them: --tokens, --frames/--size, or --grid.

    None of them: 8k, 32k, 125k. --frames alone uses 480p; --size alone uses 21 latent frames.
    """
    named = [flag for flag, value in (("--tokens", tokens), ("--grid", grid)) if value is not None]
    if frames is not None or size is not None:
        named.append("--frames/--size")
    if len(named) > 1:
        raise ConfigError(f"give the sizes one way: {' or '.join(named)}, not both")
    if grid is not None:
        grids = [parse_grid(part) for part in split_list(grid)]
    elif frames is not None or size is not None:
        pixels = parse_video_size(size or "480p")
        frame_counts = [_latent_frames(part) for part in split_list(frames or str(GRID_480P[0]))]
        grids = [video_grid(count, pixels) for count in frame_counts]
    else:
        grids = [grid_for_tokens(parse_token_count(part)) for part in split_list(tokens or "8k,32k,125k")]
    if not grids:
        raise ConfigError("no token counts given; e.g. --tokens 8k,32k")
    return list(dict.fromkeys(grids))  # unique, in the order given


def _latent_frames(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"--frames {text!r}: give latent frames T' as integers, e.g. 21 (= 81 video frames)"
        ) from None
