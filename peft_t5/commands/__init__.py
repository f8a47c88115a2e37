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
        adapters[name] = path
    return adapters
