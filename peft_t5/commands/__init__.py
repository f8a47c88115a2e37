"""One module per command: it parses its flags and calls one library function (cli.py dispatches to them).

Every command spells its flags one way: underscores (the hyphenated form is taken too, as HfArgumentParser's help
shows it), the same name for the same thing (--model: the base model, or a whole model; --output_dir: the folder
written; --overwrite_output_dir), no abbreviations; an old spelling gets a one-line pointer to the new one."""
from __future__ import annotations

from ..arguments import FlagParser, normalized
from ..checks import MAX_NEW_TOKENS, check_output_file, check_ranges  # noqa: F401  (the commands' shared checks)
from ..errors import PeftT5Error

RENAMED = {"--base": "--model", "--output": "--output_dir", "--overwrite": "--overwrite_output_dir"}


def command_parser(prog: str, description: str) -> FlagParser:
    return FlagParser(prog=prog, description=description, allow_abbrev=False)


def parse_flags(parser: FlagParser, argv: list[str], renamed: dict[str, str] = RENAMED):
    """The flags; an unknown one is refused first (naming the closest real one), before argparse's other checks."""
    argv = normalized(argv, renamed)
    known = {o for a in parser._actions for o in a.option_strings}
    unknown = next((a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known), None)
    if unknown:
        parser.error(f"unrecognized arguments: {unknown}")
    return parser.parse_args(argv)


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
