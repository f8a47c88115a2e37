"""squad_extractive: SQuAD v2.0 answered as a span of the context (or no answer), by a span head on T5.

The same data, splits and scores as `squad`; the model is `T5ForQuestionAnswering` and the adapter is PEFT's
QUESTION_ANS kind. How windows, the no-answer position and answers work: peft_t5/extractive.py.
"""
from __future__ import annotations

from ..metrics.squad_v2 import squad_v2_scores
from .registry import Task
from .squad import SAMPLE, answer_span, check_squad_layout, load_splits, stream_squad

TASK = Task(
    name="squad_extractive",
    default_model="t5-small",
    default_data="rajpurkar/squad_v2",
    sample=SAMPLE,
    template="question: {question} context: {context}",  # shown and saved; the windows are built in extractive.py
    truncate_field="context",
    target=lambda record: record["answers"][0] if record["answers"] else "",
    answer_span=answer_span,
    answer_from_output=lambda text: text.strip(),
    references=lambda record: record["answers"],
    scores=squad_v2_scores,
    sweep_objective="eval_f1",
    main_metric="f1",
    load_splits=load_splits,
    stream=stream_squad,
    check_layout=check_squad_layout,
    empty_output="(no answer)",
    kind="extractive",
)
