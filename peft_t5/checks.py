"""Checks of settings that every entry (a command's flags, a library call's keywords) shares, done before anything is
loaded or written: numbers in range, an output file that can be written."""
from __future__ import annotations

from pathlib import Path

from .errors import PeftT5Error

MAX_NEW_TOKENS = 1024  # T5's targets are far shorter; a larger ask is a typo that would run unbounded


def check_ranges(values, **bounds: tuple[float, float]) -> None:
    """Numeric settings within [low, high] (None: not given), or one line naming the flag and its range. values: a
    dict, or parsed flags."""
    values = values if isinstance(values, dict) else vars(values)
    for name, (low, high) in bounds.items():
        value = values.get(name)
        if value is not None and not low <= value <= high:
            raise PeftT5Error(f"--{name} {value}: must be from {low:g} to {high:g}")


def check_output_file(path: str, flag: str) -> None:
    """A file path that can be written: not a folder, not under a file, its nearest existing folder writable.
    Nothing is created."""
    import tempfile

    target = Path(path)
    if target.is_dir():
        raise PeftT5Error(f"{flag} {path}: is a folder; pass a file path, e.g. {target / 'preds.json'}")
    under_file = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if under_file:
        raise PeftT5Error(f"{flag} {path}: lies under {under_file}, a file; pass a path in a folder")
    existing = next(p for p in (target.parent, *target.parent.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise PeftT5Error(f"{flag} {path}: cannot write in {existing} ({e.strerror}); pass a path you can write to")
