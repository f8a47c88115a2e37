"""A task is one small module that builds a `Task`: how to read records, prompt them and score outputs.

Adding a third task means writing one module beside squad.py and jokes.py and adding it to `_MODULES`.
Nothing here imports torch, so tasks load and test in milliseconds.
"""
from __future__ import annotations

import codecs
import importlib
import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import DataError, PeftT5Error

Record = dict
Splits = dict[str, list[Record]]
logger = logging.getLogger(__name__)


def template_fields(template: str) -> list[str]:
    """The fields a prompt template fills, in order: `question: {question} context: {context}` -> question, context."""
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass(frozen=True)
class Task:
    name: str
    default_model: str  # Hub id of the base the task was designed for
    default_data: str  # Hub dataset id or bundled sample path, used when --data is not given
    sample: str  # the small sample bundled in peft_t5/data/ (offline demo, tests, --model tiny)
    template: str  # source prompt, formatted with the record's fields; saved with the adapter
    truncate_field: str | None  # the field cut when the source is too long (must come last in the template)
    target: Callable[[Record], str]  # the text the model learns to produce
    answer_span: Callable[[Record], tuple[int, int] | None]  # char span of the target inside truncate_field
    answer_from_output: Callable[[str], str]  # generated text -> the task's answer (e.g. no-answer -> "")
    references: Callable[[Record], list[str]]  # gold answers for scoring
    scores: Callable[[list[str], list[list[str]]], dict[str, float]]  # answers, references -> metrics
    main_metric: str  # the metric named in logs and used to compare adapters
    sweep_objective: str  # what `peft-t5 sweep` optimizes by default: an evaluation metric's log name
    load_splits: Callable[..., Splits]  # (data, seed=..., **options) -> {"train": [...], "validation": [...], ...}
    stream: Callable[..., Iterator[Record]]  # (data, **options) -> usable records one at a time (--streaming)
    check_layout: Callable[[str], None] = lambda path: None  # a quick look at a local file's start: DataError if
    # it cannot be this task's data (the columns, the format), so train refuses it before the heavy imports
    printable: Callable[[str], bool] = lambda text: True  # may this text be printed in a log (jokes: word filter)
    no_answer: str | None = None  # the target that means "no answer" (squad), for the no-answer probability
    empty_output: str = "(empty output)"  # how an empty answer is shown (squad: "(no answer)", a real answer)
    kind: str = "generate"  # "extractive": the answer is a span of the context, read off a span head

    def source(self, record: Record) -> str:
        return self.template.format(**record)


def looks_like_hub_id(data: str) -> bool:
    """owner/name, with no local file or folder of that name: a Hub dataset id."""
    return (not Path(data).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", data) is not None
            and not data.endswith((".json", ".jsonl", ".csv", ".tsv", ".txt")))


@contextmanager
def reading(path: str, what: str):
    """Turns the errors of opening and decoding a data file into one line naming the file and the fix."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; pass {what}")
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; pass {what}")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e}); re-save the file as UTF-8")


def _guess_encoding(path: str, data: bytes, complete: bool) -> str:
    """The encoding spreadsheet programs and editors save text in: a byte-order mark says UTF-8 or UTF-16 (Excel's
    "CSV UTF-8", "Unicode text"); else UTF-8 if `data` decodes, else Windows-1252 (Excel's plain "CSV" on Western
    Windows), said once. complete: `data` is the whole file (else its start, which may end mid-character)."""
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
        return "utf-8"
    except UnicodeDecodeError:
        logger.warning("%s: not UTF-8; read as Windows-1252, as Excel saves CSV on Windows (re-save it as "
                       "\"CSV UTF-8\" if characters look wrong)", path)
        return "cp1252"


SPREADSHEETS = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")


def read_text(path: str, what: str) -> str:
    """A whole text file, read once and decoded as it was saved (see _guess_encoding); errors name the file."""
    if path.lower().endswith(SPREADSHEETS):
        raise DataError(f"{path}: a spreadsheet, not a text file; save it as CSV (\"CSV UTF-8\") and pass that")
    with reading(path, what):
        data = Path(path).read_bytes()
        return data.decode(_guess_encoding(path, data, complete=True))


def text_encoding(path: str, what: str) -> str:
    """The encoding of a file too large to read whole (streams), guessed from its first MiB."""
    with reading(path, what), open(path, "rb") as f:
        return _guess_encoding(path, f.read(1 << 20), complete=False)


def csv_delimiter(f) -> str:
    """, or ; (Excel where the decimal mark is a comma) or a tab, whichever the header line has most of."""
    header = f.readline()
    f.seek(0)
    return max((",", ";", "\t"), key=header.count) if any(d in header for d in ",;\t") else ","


def stream_json_lines(path: str, what: str) -> Iterator[dict]:
    """The records of a JSON-lines file one at a time; errors name the file, the line and the fix."""
    with reading(path, what), open(path, encoding=text_encoding(path, what)) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {number}: not JSON ({e}); expected one record per line")


def stream_hub(dataset_id: str):
    """The train split of a Hub dataset, streamed (nothing downloaded in full)."""
    import datasets  # only here: the Hub path needs the network

    try:
        return datasets.load_dataset(dataset_id, split="train", streaming=True)
    except Exception as e:  # network, authentication, unknown id: all the user can act on is the message
        raise DataError(f"{dataset_id}: cannot stream this Hub dataset ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}); check the id and the network, or pass a local file")


_MODULES = {"squad": "peft_t5.tasks.squad", "squad_extractive": "peft_t5.tasks.squad_extractive",
            "jokes": "peft_t5.tasks.jokes"}


def task_names() -> list[str]:
    return sorted(_MODULES)


def get_task(name: str) -> Task:
    if name not in _MODULES:
        raise PeftT5Error(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return importlib.import_module(_MODULES[name]).TASK
