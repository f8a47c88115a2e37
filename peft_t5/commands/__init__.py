"""One module per command: its arguments and its function (cli.py dispatches to them)."""
from __future__ import annotations

from ..errors import PeftT5Error


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """--adapter NAME=FOLDER, repeated, as {name: folder}."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise PeftT5Error(f"--adapter {spec}: expected NAME=FOLDER, e.g. jokes=adapters/jokes")
        if name in adapters:
            raise PeftT5Error(f"--adapter {spec}: the name {name!r} is given twice ({adapters[name]} and {path}); "
                              "give each adapter its own name")
        adapters[name] = path
    return adapters


MAX_NEW_TOKENS = 1024  # T5's targets are far shorter; a larger ask is a typo that would run unbounded


def check_ranges(args, **bounds: tuple[float, float]) -> None:
    """Numeric flags within [low, high] (None: not given), or one line naming the flag and its range."""
    for name, (low, high) in bounds.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            raise PeftT5Error(f"--{name} {value}: must be from {low:g} to {high:g}")


def check_output_file(path: str, flag: str) -> None:
    """A file path that can be written: not a folder, not under a file, its nearest existing folder writable.
    Checked before anything is loaded; nothing is created."""
    import tempfile
    from pathlib import Path

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
