"""Reading a user's text file (a TOML config, a captions manifest) with one clear error for bad bytes."""

from __future__ import annotations

from pathlib import Path

from eflow.errors import EflowError


def read_utf8(path: str | Path) -> str:
    """The file's text; bytes that are not UTF-8 fail naming the file, the line and the byte offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise EflowError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None
