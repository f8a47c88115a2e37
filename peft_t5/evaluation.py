"""Generate a task's answers for held-out records and score them: SQuAD v2 officially, jokes by text metrics.

    import peft_t5
    result = peft_t5.evaluate(task="jokes", adapter="adapters/jokes", predictions="preds/jokes.json")
    result.metrics["rougeL"]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .checks import MAX_NEW_TOKENS, check_output_file, check_ranges
from .errors import PeftT5Error
from .tasks import Task

SQUAD_FILE_TASKS = ("squad", "squad_extractive")  # scored over a SQuAD v2 JSON file, officially


@dataclass
class EvaluationResult:
    metrics: dict  # of the adapter (or of the model, evaluated alone)
    base_metrics: dict | None  # of the bare base, with compare_base
    predictions: str  # the predictions file; its metrics (and for squad, no-answer probabilities) lie beside it
    model: str  # the base model evaluated
    data: str  # the data file scored
    na_threshold: float | None  # squad: the no-answer threshold applied


def evaluate(task: str, predictions: str, adapter: str | None = None, model: str | None = None,
             data: str | None = None, limit: int | None = None, num_beams: int = 1, batch_size: int = 16,
             max_source_length: int = 512, max_new_tokens: int = 64, seed: int = 42, compare_base: bool = False,
             na_threshold: float | None = None, trust_pickle: bool = False, doc_stride: int | None = None,
             max_answer_length: int | None = None) -> EvaluationResult:
    """Generate answers for held-out records (squad: all of `data`; jokes: its test split, as training split it)
    and score them; predictions and metrics are written to `predictions` and beside it. squad_extractive answers
    by span (doc_stride and max_answer_length: the adapter's, unless given); its na_threshold is a margin of
    logits (the null score over the best span's), not a probability."""
    import contextlib

    from .adapters import read_metadata
    from .tasks import get_task

    task = get_task(task)
    spans = task.kind == "extractive"
    check_ranges(dict(num_beams=num_beams, batch_size=batch_size, max_source_length=max_source_length,
                      max_new_tokens=max_new_tokens, limit=limit, na_threshold=na_threshold, doc_stride=doc_stride,
                      max_answer_length=max_answer_length),
                 num_beams=(1, 16), batch_size=(1, 4096), max_source_length=(1, 65536),
                 max_new_tokens=(1, MAX_NEW_TOKENS), limit=(1, float("inf")),
                 na_threshold=(-float("inf"), float("inf")) if spans else (0, 1), doc_stride=(0, 65536),
                 max_answer_length=(1, 65536))
    check_output_file(predictions, "--predictions")
    meta = read_metadata(adapter, trust_pickle) if adapter else {}
    recorded = meta.get("na_threshold")
    default = 0.0 if spans else 1.0
    na_threshold = na_threshold if na_threshold is not None else (default if recorded is None else recorded)
    if meta.get("task") and meta["task"] != task.name:
        raise PeftT5Error(f"--adapter {adapter} was trained for task '{meta['task']}', not '{task.name}'; "
                          f"pass --task {meta['task']} or an adapter trained for {task.name}")
    model_name = model or meta.get("base_model") or task.default_model
    data = data or task.sample
    if task.name in SQUAD_FILE_TASKS:
        from .tasks.squad import read_squad_v2

        records, articles = read_squad_v2(data), json.loads(Path(data).read_text(encoding="utf-8"))["data"]
    else:
        records, articles = task.load_splits(data, seed=seed)["test"], None
    records = records[:limit]
    if not records:
        raise PeftT5Error(f"{data}: no records to evaluate")
    loaded, tokenizer = load_for_evaluation(model_name, adapter, trust_pickle, span_head=spans)
    options = dict(batch_size=batch_size, max_source_length=max_source_length)
    if spans:
        options.update(doc_stride=doc_stride if doc_stride is not None else meta.get("doc_stride", 128),
                       max_answer_length=max_answer_length or meta.get("max_answer_length", 30))
    else:
        options.update(num_beams=num_beams, max_new_tokens=max_new_tokens)
    systems = {"adapter" if adapter else "model": contextlib.nullcontext}
    if adapter and compare_base:
        systems["base"] = loaded.disable_adapter
    out = Path(predictions)
    results = {}
    for system, context in systems.items():
        with context():
            answers, na_probs = (predict_spans if spans else predict)(loaded, tokenizer, task, records, **options)
        path = out if system != "base" else out.with_name(f"{out.stem}.base{out.suffix}")
        if spans:  # the answers as given: "" where the null score wins by more than the threshold
            written = {r["id"]: ("" if p > na_threshold else a) for r, a, p in zip(records, answers, na_probs)}
        elif task.name == "squad":
            written = {r["id"]: a for r, a in zip(records, answers)}
        else:
            written = [{"question": r["question"], "reference": r["answer"], "prediction": a}
                       for r, a in zip(records, answers)]
        results[system] = score(task, records, answers, articles, na_probs, na_threshold)
        files = {path: written, path.with_name(f"{path.stem}.metrics.json"): results[system]}
        if na_probs is not None:  # the official na_prob file: python -m peft_t5.metrics.squad_v2 ... -n it
            files[path.with_name(f"{path.stem}.na_prob.json")] = {r["id"]: p for r, p in zip(records, na_probs)}
        write_json_files(files, "--predictions")
    return EvaluationResult(results.pop("adapter", None) or results.pop("model"), results.get("base"), str(out),
                            model_name, data, na_threshold if task.name in SQUAD_FILE_TASKS else None)


def load_for_evaluation(model_name: str, adapter: str | None, trust_pickle: bool = False, span_head: bool = False):
    """The base (and adapter, when given) and the tokenizer that goes with them."""
    from transformers import AutoTokenizer

    from .adapters import check_adapter_fits, peft_from_pretrained
    from .modeling import load_base_model, load_tokenizer

    model = load_base_model(model_name, trust_pickle=trust_pickle, span_head=span_head)
    if adapter is None:
        return model.eval(), load_tokenizer(model_name)
    check_adapter_fits(model, adapter, model_name)
    return peft_from_pretrained(model, adapter).eval(), AutoTokenizer.from_pretrained(adapter)


def write_json_files(files: dict[Path, object], flag: str) -> None:
    for path, content in files.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise PeftT5Error(f"{flag}: cannot write {path} ({e.strerror}); pass a path you can write to")


def predict(model, tokenizer, task: Task, records: list[dict], batch_size: int = 16, num_beams: int = 1,
            max_source_length: int = 512, max_new_tokens: int = 64) -> tuple[list[str], list[float] | None]:
    """The task's answers (squad: no-answer -> ""), generated in length-sorted batches with a progress bar, and
    for a task with a no-answer target, each record's no-answer probability (else None)."""
    from .generation import generate_texts, no_answer_probs  # torch: after the settings are checked

    sources = [task.source(r) for r in records]
    outputs = generate_texts(model, tokenizer, sources, batch_size=batch_size, max_source_length=max_source_length,
                             max_new_tokens=max_new_tokens, num_beams=num_beams, progress=True)
    na = (no_answer_probs(model, tokenizer, sources, outputs, task.no_answer, batch_size, max_source_length,
                          max_new_tokens) if task.no_answer else None)
    return [task.answer_from_output(o) for o in outputs], na


def predict_spans(model, tokenizer, task: Task, records: list[dict], batch_size: int = 16,
                  max_source_length: int = 512, doc_stride: int = 128,
                  max_answer_length: int = 30) -> tuple[list[str], list[float]]:
    """squad_extractive: each record's best span (one forward pass per batch of windows) and its null margin."""
    from .extractive import answer_records

    found = answer_records(model, tokenizer, records, max_source_length, doc_stride, max_answer_length, batch_size)
    return [a.text for a in found], [a.na_score for a in found]


def squad_subset(articles: list[dict], ids: set[str]) -> list[dict]:
    """The SQuAD articles keeping only the questions in `ids`, so that --limit scores only what was predicted."""
    out = []
    for article in articles:
        paragraphs = [dict(p, qas=[qa for qa in p["qas"] if qa["id"] in ids]) for p in article["paragraphs"]]
        paragraphs = [p for p in paragraphs if p["qas"]]
        if paragraphs:
            out.append(dict(article, paragraphs=paragraphs))
    return out


def score(task: Task, records: list[dict], answers: list[str], articles: list[dict] | None = None,
          na_probs: list[float] | None = None, na_threshold: float = 1.0) -> dict:
    """squad: the official metrics over the predicted questions (with na_probs: best_exact/best_f1, and exact/f1
    with answers over na_threshold dropped, as the official script's -t); jokes: text metrics."""
    from .metrics.squad_v2 import squad_v2_evaluate
    from .metrics.text import joke_scores

    if task.name in SQUAD_FILE_TASKS:
        preds = {r["id"]: a for r, a in zip(records, answers)}
        probs = None if na_probs is None else {r["id"]: p for r, p in zip(records, na_probs)}
        metrics, _ = squad_v2_evaluate(squad_subset(articles, set(preds)), preds, probs, na_threshold)
        return dict(metrics)
    return joke_scores(answers, [task.references(r)[0] for r in records], [r["question"] for r in records])
