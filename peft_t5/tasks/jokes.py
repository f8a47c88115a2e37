"""jokes: question -> punchline generation from reddit question-answer jokes.

Reads a CSV or JSON/JSON-lines file with Question/Answer columns (any case) or reddit dump records
with title/body, keeps the question-answer jokes and splits them deterministically from a seed.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..metrics.text import generation_scores
from .registry import (
    Record,
    Splits,
    Task,
    csv_delimiter,
    looks_like_hub_id,
    read_text,
    reading,
    stream_hub,
    stream_json_lines,
    text_encoding,
)

logger = logging.getLogger(__name__)
SAMPLE = str(Path(__file__).resolve().parent.parent / "data" / "jokes_sample.csv")
_COLUMN_PAIRS = (("question", "answer"), ("title", "body"))
TABLES = (".csv", ".tsv", ".txt")  # read as delimited text (comma, semicolon or tab)
# Word stems that mark a joke as crude, sexual, violent or about groups of people: the bundled sample's filter,
# and what the samples printed after training skip.
OFFENSIVE = re.compile(
    r"\b(sex|porn|rape|penis|vagina|dick|cock|pussy|boob|tit|ass|anal|butt|cum|fuck|shit|bitch|whore|slut|"
    r"hooker|prostitut|nigg|negro|black|white|asian|chinese|mexican|jew|muslim|arab|islam|christian|jesus|god|"
    r"gay|lesbian|trans|dead|die|kill|murder|abort|hitler|nazi|holocaust|terror|bomb|isis|blind|deaf|retard|"
    r"midget|fat|ugly|wife|girlfriend|husband|boyfriend|blonde|women|woman|girl|wom|nun|priest|pedo|child|kid|"
    r"orgasm|erect|horny|virgin|condom|nipple|breast|balls|testic|poop|fart|piss|pee|drug|weed|cocaine|drunk|"
    r"gun|shoot|suicid|cancer|aids|disab|crap|damn|hell|sucks?|blow|hole|wet|hard|length|inch|naked|strip|bra|"
    r"paedo|legs?|arms?|organ|jfk|kennedy|crash|paralymp|dwarf|amput|wheelchair|autis|epilep|handicap|tight|"
    r"stripper|moist|rubber|mother|mom|dad|wives|dating|date|bed|undress|spank|whip|slave|racist|gypsy|"
    r"mexic|irish|polish|indian|african|russian|korean|afghan|syria|iraq|israel|palestin|9/11|twin tower|"
    r"masturb|fap|kinky|pervert|coke|bab(y|ies)|bum|skirt|razor|depress|pms|mile high|underwear|stroke|fluid|"
    r"clinton|trump|hillary|putin|bully|wub|smell|eye|bernie|ill|sick|hospital|doctor|disease|prison|arrest|"
    r"rapist|homeless|urinal|parakeet|chirp|milk|puss|homosex|dill|doe|landmine|seizure|mummy|circumcis|fogle|crowbar|"
    r"mermaid|shell|gasoline|fire|minute|cannibal|fece|poo|redneck|border|juan|catholic|church|korea|blond|greek|"
    r"republican|democrat|politic|nostril|finger|lay|laid|sleep|touch|rub|wood|rear|behind|bottom|beaver|"
    r"doggy|bishop|coroner|houston|cond|offender|baiter|michael jackson|jihad|qaeda|grasshole|sensitive|stimulat|rehab|"
    r"molly|high|manure|bathroom|constipat|apartheid|terminal|fairies|stiff|sack|diabet|orphan|deport|mormon|"
    r"tweaker|dyslex|shot|shins|ali|\w*hole|boys|men|man|guy|lady|ladies|"
    r"feminis|kink|nast|diarr|rect|anus|cunt|fist|laxativ|syndrome|downs|pubic|hand job|necroph|prostat|urin|urolog|gynec|swinger|commando|tranny|drag|zipper|dolezal|anorex|abus|chav|slapper|extremist|laden|wheel ?chair|flea|dahmer|bobbit|hawking|stevie|robin williams|ledger|ray rice|zimmerman|darren wilson|michael brown|hummer|megan fox|newborn|booty|proctolog|coathanger|ebola|mesothelioma|traumatic|alabama|inbred|italian|postal|baptist|jamaican|rasta|aborigin|thai|somali|ethiopia|sikh|turban|hooligan|vietnam|deutsch|nsa|tap|dre|bullet|stones|smallest|saddam|kilt|sheep|pot|smoke|dna|goat|bloody|tongue|ethic|breed|witch|texas|unemploy|stink|funeral|taste|slip|thermometer|jockie|kicked|bucket|chick|cross|hit|wall|lighter|rated|lead|flint|rapper|tupac|shake|crack|cold one|steak|loving|hard|wreck|"
    r"britney|rampage|incontinent|69|quadripleg|limp|reptile|pits|buns|gigolo|mohel|mofo|diana|oriental|divorc|lubric|vestite|circum|skin|schizo|caitlyn|bulge|bulemi|bulimi|cosby|tampax|frank|gas|leper|ginger|year old|hips|siamese|riot|dodi|india|soviet|german|bulldog|shih|dirty|adolf|choke|bieber|pp|spanish|taliban|malala|iran|native|egypt|middle east|mooch|chest|ball|period|trailer|addict|alcohol|beer|wine|drink|bar|moron|stupid|idiot|lazy|insan|crazy|mental|anxi|"
    r"female|male|jew|debate|blower|nurse|tweek|doggie|comedian|roof|errect|genes|gladiator|bdsm|hispanic|turn on|"
    r"hindu|prayer|roman|caesar|robber|steal|cop|police|hairy|hair|"
    r"limb|crip|sjw|night stand|grenade|kkk|snow ?blower|masoch|grave|dying|spaniard|saggy|midwife|entendre|punch|"
    r"toilet|vomit|semen|sperm|pregnan|boner|wank|jerk|dildo|lick|swallow|screw|bang|nut)",
    re.IGNORECASE,
)


def _read_rows(path: str) -> list[dict]:
    text = read_text(path, "a jokes CSV or JSON file")
    if path.lower().endswith(TABLES):
        table = io.StringIO(text, newline="")
        try:  # malformed quoting is an error, not a silent misparse
            return list(csv.DictReader(table, delimiter=csv_delimiter(table), strict=True))
        except csv.Error as e:
            raise DataError(f"{path}: not a valid CSV file ({e})")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON lines, as reddit dumps come
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: neither JSON nor JSON lines ({e})")
    if isinstance(rows, dict):
        rows = next((v for v in rows.values() if isinstance(v, list)), [rows])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a list of records with question/answer or title/body fields")
    return rows


def _field_names(path: str, columns) -> tuple[str, str]:
    """The question and answer column of a file, whichever pair it uses (names in any case)."""
    by_lower = {str(k).lower(): k for k in columns}
    pair = next((p for p in _COLUMN_PAIRS if p[0] in by_lower and p[1] in by_lower), None)
    if pair is None:
        raise DataError(f"{path}: record 0 has columns {sorted(by_lower)}; expected Question/Answer or title/body")
    return by_lower[pair[0]], by_lower[pair[1]]


def _record(row: dict, q_key: str, a_key: str) -> Record:
    return {"question": str(row.get(q_key) or "").strip(), "answer": str(row.get(a_key) or "").strip()}


def read_jokes(path: str) -> list[Record]:
    """Every row as {question, answer}, whichever column pair the file uses (names in any case)."""
    return _read_with_empty(path)[0]


def _read_with_empty(path: str) -> tuple[list[Record], int]:
    """The non-empty records, and how many had an empty question or answer (named once in a warning)."""
    rows = _read_rows(path)
    if not rows:
        return [], 0
    q_key, a_key = _field_names(path, rows[0])
    records = [_record(r, q_key, a_key) for r in rows]
    empty = [i for i, r in enumerate(records) if not r["question"] or not r["answer"]]
    if empty:
        logger.warning("%s: skipped %d of %d records with an empty %s or %s (first: record %d); fix or remove them",
                       path, len(empty), len(records), q_key, a_key, empty[0])
    return [r for r in records if r["question"] and r["answer"]], len(empty)


def _stream_rows(path: str) -> Iterator[dict]:
    """Rows of a CSV or JSON-lines file one at a time, with the same strict CSV parsing as _read_rows."""
    if not path.lower().endswith(TABLES):
        yield from stream_json_lines(path, "a jokes CSV or JSON-lines file")
        return
    encoding = text_encoding(path, "a jokes CSV or JSON-lines file")
    with reading(path, "a jokes CSV or JSON-lines file"), open(path, encoding=encoding, newline="") as f:
        reader = csv.DictReader(f, delimiter=csv_delimiter(f), strict=True)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}: the record after line {reader.line_num} is not valid CSV ({e}); "
                                "fix its quoting")
            yield row


def stream_jokes(data: str, max_question_words: int = 40, max_answer_words: int = 25, **_options) -> Iterator[Record]:
    """The question-answer jokes of a file or Hub dataset, one at a time: for data larger than memory."""
    rows = stream_hub(data) if looks_like_hub_id(data) else _stream_rows(data)
    keys = None
    for row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{data}: a record that is not an object ({str(row)[:60]}); expected question/answer fields")
        keys = keys or _field_names(data, row)
        record = _record(row, *keys)
        if is_qa_joke(record, max_question_words, max_answer_words):
            yield record


def check_jokes_layout(path: str) -> None:
    """A CSV's header names a question and an answer column (its first line read, not the whole file)."""
    if path.lower().endswith(TABLES):
        what = "a jokes CSV or JSON-lines file"
        with reading(path, what), open(path, encoding=text_encoding(path, what), newline="") as f:
            header = next(csv.reader([f.readline()], delimiter=csv_delimiter(f)), [])
            f.seek(0)
            lines = (line for line in f if line.strip())
            next(lines, None)  # the header
            first = next(lines, None)
        if not header or first is None:  # what load_splits says, said before the heavy imports
            raise DataError(f"{path}: the file has no rows (a header at most); add question-answer rows")
        _field_names(path, header)


def read_hub_jokes(dataset_id: str) -> list[Record]:
    import datasets  # only here: the Hub path needs the network

    try:
        rows = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # network, authentication, unknown id: all the user can act on is the message
        raise DataError(f"{dataset_id}: cannot load this Hub dataset ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "check the id and the network, or pass a local jokes CSV")
    records = [{str(k).lower(): str(v or "").strip() for k, v in r.items()} for r in rows]
    return [{"question": r.get("question", r.get("title", "")), "answer": r.get("answer", r.get("body", ""))}
            for r in records]


def is_qa_joke(record: Record, max_question_words: int = 40, max_answer_words: int = 25) -> bool:
    """A question-answer joke: the question ends in '?', both sides are present and short."""
    q, a = record["question"], record["answer"]
    return (q.endswith("?") and bool(a) and len(q.split()) <= max_question_words
            and len(a.split()) <= max_answer_words)


def split_records(records: list[Record], seed: int, validation_fraction: float, test_fraction: float) -> Splits:
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    n_val, n_test = round(len(shuffled) * validation_fraction), round(len(shuffled) * test_fraction)
    return {
        "validation": shuffled[:n_val],
        "test": shuffled[n_val:n_val + n_test],
        "train": shuffled[n_val + n_test:],
    }


def load_splits(data: str, seed: int = 42, validation_fraction: float = 0.05, test_fraction: float = 0.05,
                max_question_words: int = 40, max_answer_words: int = 25, **_options) -> Splits:
    records, empty = (read_hub_jokes(data), 0) if looks_like_hub_id(data) else _read_with_empty(data)
    if not records and not empty:
        raise DataError(f"{data}: the file has no rows (a header at most); add question-answer rows")
    kept = [r for r in records if is_qa_joke(r, max_question_words, max_answer_words)]
    if not kept:
        raise DataError(f"{data}: none of {len(records)} records is a question-answer joke "
                        f"(question ending in '?', answer of at most {max_answer_words} words)")
    splits = split_records(kept, seed, validation_fraction, test_fraction)
    not_qa = f"not question-answer jokes (no '?', or over {max_question_words}/{max_answer_words} words)"
    splits["skipped"] = ([{"reason": "empty question or answer"}] * empty
                         + [{"reason": not_qa}] * (len(records) - len(kept)))
    return splits


TASK = Task(
    name="jokes",
    default_model="google/flan-t5-large",
    default_data=SAMPLE,
    sample=SAMPLE,
    template="{question}",
    truncate_field=None,
    target=lambda record: record["answer"],
    answer_span=lambda record: None,
    answer_from_output=str.strip,
    references=lambda record: [record["answer"]],
    scores=generation_scores,
    sweep_objective="eval_loss",  # the validation loss: no generation needed at each evaluation
    main_metric="rougeL",
    load_splits=load_splits,
    stream=stream_jokes,
    check_layout=check_jokes_layout,
    printable=lambda text: not OFFENSIVE.search(text),
)
