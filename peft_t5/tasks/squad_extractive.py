"""squad_extractive: SQuAD v2.0 answered as a span of the context (or no answer), by a span head on T5.

The same data, splits and scores as `squad` (its Task, with what differs replaced); the model is
`T5ForQuestionAnswering` and the adapter is PEFT's QUESTION_ANS kind. How windows, the no-answer position and
answers work: peft_t5/extractive.py.
"""
from __future__ import annotations

from dataclasses import replace

from .squad import TASK as SQUAD

TASK = replace(
    SQUAD,
    name="squad_extractive",
    target=lambda record: record["answers"][0] if record["answers"] else "",  # shown in logs; spans are trained
    answer_from_output=lambda text: text.strip(),
    no_answer=None,  # no generated no-answer word: the span head's position 0 stands for it
    kind="extractive",
)
