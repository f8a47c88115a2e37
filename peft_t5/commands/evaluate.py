"""`peft-t5 evaluate` (scripts/evaluate.py): generate answers for held-out data and score them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import PeftT5Error


def load_for_evaluation(model_name: str, adapter: str | None, trust_pickle: bool = False):
    """The base (and adapter, when given) and the tokenizer that goes with them."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ..adapters import check_adapter_fits
    from ..modeling import load_base_model, load_tokenizer

    model = load_base_model(model_name, trust_pickle=trust_pickle)
    if adapter is None:
        return model.eval(), load_tokenizer(model_name)
    check_adapter_fits(model, adapter, model_name)
    return PeftModel.from_pretrained(model, adapter).eval(), AutoTokenizer.from_pretrained(adapter)


def evaluate_main(argv: list[str]) -> None:
    import contextlib

    from ..adapters import read_metadata
    from ..evaluation import predict, score
    from ..tasks import get_task, task_names

    parser = argparse.ArgumentParser(prog="evaluate.py", description="Generate answers for held-out data and score them.")
    parser.add_argument("--task", required=True, choices=task_names())
    parser.add_argument("--model", help="Base model (Hub id, folder, tiny); default: the adapter's recorded base")
    parser.add_argument("--adapter", help="An adapter folder to evaluate on the base")
    parser.add_argument("--data", help="squad: a SQuAD v2.0 JSON file (all of it is scored); jokes: a jokes file "
                                       "(its test split is scored); default: the bundled sample")
    parser.add_argument("--predictions", required=True, help="Where to write predictions; metrics go beside it")
    parser.add_argument("--limit", type=int, help="Score only the first N records")
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_source_length", type=int, default=512)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42, help="jokes: the split seed used in training")
    parser.add_argument("--compare-base", action="store_true", help="With --adapter: score the base model too")
    parser.add_argument("--na_threshold", type=float, help="squad: answers whose no-answer probability is over this "
                        "count as no answer (default: the adapter's recorded threshold, else 1.0, i.e. none)")
    parser.add_argument("--trust_pickle", action="store_true", help="Allow pickled .bin weights (they can run code)")
    args = parser.parse_args(argv)
    task = get_task(args.task)
    meta = read_metadata(args.adapter, args.trust_pickle) if args.adapter else {}
    recorded = meta.get("na_threshold")
    na_threshold = args.na_threshold if args.na_threshold is not None else (1.0 if recorded is None else recorded)
    if meta.get("task") and meta["task"] != task.name:
        raise PeftT5Error(f"--adapter {args.adapter} was trained for task '{meta['task']}', not '{task.name}'; "
                          f"pass --task {meta['task']} or an adapter trained for {task.name}")
    model_name = args.model or meta.get("base_model") or task.default_model
    data = args.data or task.sample

    if task.name == "squad":
        from ..tasks.squad import read_squad_v2

        records, articles = read_squad_v2(data), json.loads(Path(data).read_text(encoding="utf-8"))["data"]
    else:
        records, articles = task.load_splits(data, seed=args.seed)["test"], None
    records = records[:args.limit]
    if not records:
        raise PeftT5Error(f"{data}: no records to evaluate")
    model, tokenizer = load_for_evaluation(model_name, args.adapter, args.trust_pickle)
    options = dict(batch_size=args.batch_size, num_beams=args.num_beams, max_source_length=args.max_source_length,
                   max_new_tokens=args.max_new_tokens)
    systems = {"adapter" if args.adapter else "model": contextlib.nullcontext}
    if args.adapter and args.compare_base:
        systems["base"] = model.disable_adapter
    out = Path(args.predictions)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for system, context in systems.items():
        with context():
            answers, na_probs = predict(model, tokenizer, task, records, **options)
        path = out if system != "base" else out.with_name(f"{out.stem}.base{out.suffix}")
        if task.name == "squad":
            predictions = {r["id"]: a for r, a in zip(records, answers)}
        else:
            predictions = [{"question": r["question"], "reference": r["answer"], "prediction": a}
                           for r, a in zip(records, answers)]
        path.write_text(json.dumps(predictions, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if na_probs is not None:  # the official na_prob file: python -m peft_t5.metrics.squad_v2 ... -n it
            na_path = path.with_name(f"{path.stem}.na_prob.json")
            na_path.write_text(json.dumps({r["id"]: p for r, p in zip(records, na_probs)}, indent=1) + "\n")
        results[system] = score(task, records, answers, articles, na_probs, na_threshold)
        path.with_name(f"{path.stem}.metrics.json").write_text(json.dumps(results[system], indent=2) + "\n")
    for system, metrics in results.items():
        print(f"{system} ({model_name}{' + ' + args.adapter if system == 'adapter' else ''}):")
        print(json.dumps(metrics, indent=2))
    if task.name == "squad":
        print(f"no-answer threshold applied: {na_threshold:g}; the official script gives the same from the files: "
              f"python -m peft_t5.metrics.squad_v2 {data} {out} -n {out.with_name(out.stem + '.na_prob.json')} "
              f"-t {na_threshold!r}")
