"""`peft-t5 evaluate` (scripts/evaluate.py): generate answers for held-out data and score them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import PeftT5Error


def load_for_evaluation(model_name: str, adapter: str | None, trust_pickle: bool = False):
    """The base (and adapter, when given) and the tokenizer that goes with them."""
    from transformers import AutoTokenizer

    from ..adapters import check_adapter_fits, peft_from_pretrained
    from ..modeling import load_base_model, load_tokenizer

    model = load_base_model(model_name, trust_pickle=trust_pickle)
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


def build_parser() -> argparse.ArgumentParser:
    from ..tasks import task_names

    parser = argparse.ArgumentParser(prog="peft-t5 evaluate", description=(
        "Generate answers for held-out data and score them (also: python scripts/evaluate.py)."))
    parser.add_argument("--task", required=True, choices=task_names(), help="The task the adapter was trained for")
    parser.add_argument("--model", help="Base model (Hub id, folder, tiny); default: the adapter's recorded base")
    parser.add_argument("--adapter", help="An adapter folder to evaluate on the base")
    parser.add_argument("--data", help="squad: a SQuAD v2.0 JSON file (all of it is scored); jokes: a jokes file "
                                       "(its test split is scored); default: the bundled sample")
    parser.add_argument("--predictions", required=True, help="Where to write predictions; metrics go beside it")
    parser.add_argument("--limit", type=int, help="Score only the first N records")
    parser.add_argument("--num_beams", type=int, default=1, help="Beams for beam search (default 1: greedy)")
    parser.add_argument("--batch_size", type=int, default=16, help="Sources generated together (default 16)")
    parser.add_argument("--max_source_length", type=int, default=512,
                        help="Source tokens kept; longer sources are cut as in training (default 512)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Longest answer generated, in tokens (default 64)")
    parser.add_argument("--seed", type=int, default=42, help="jokes: the split seed used in training")
    parser.add_argument("--compare-base", action="store_true", help="With --adapter: score the base model too")
    parser.add_argument("--na_threshold", type=float, help="squad: answers whose no-answer probability is over this "
                        "count as no answer (default: the adapter's recorded threshold, else 1.0, i.e. none)")
    parser.add_argument("--trust_pickle", action="store_true", help="Allow pickled .bin weights (they can run code)")
    return parser


def evaluate_main(argv: list[str]) -> None:
    import contextlib

    from . import MAX_NEW_TOKENS, check_output_file, check_ranges

    args = build_parser().parse_args(argv)
    check_ranges(args, num_beams=(1, 16), batch_size=(1, 4096), max_source_length=(1, 65536),
                 max_new_tokens=(1, MAX_NEW_TOKENS), limit=(1, float("inf")), na_threshold=(0, 1))
    check_output_file(args.predictions, "--predictions")

    from ..adapters import read_metadata
    from ..evaluation import predict, score
    from ..tasks import get_task

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
        results[system] = score(task, records, answers, articles, na_probs, na_threshold)
        files = {path: predictions, path.with_name(f"{path.stem}.metrics.json"): results[system]}
        if na_probs is not None:  # the official na_prob file: python -m peft_t5.metrics.squad_v2 ... -n it
            files[path.with_name(f"{path.stem}.na_prob.json")] = {r["id"]: p for r, p in zip(records, na_probs)}
        write_json_files(files, "--predictions")
    for system, metrics in results.items():
        print(f"{system} ({model_name}{' + ' + args.adapter if system == 'adapter' else ''}):")
        print(json.dumps(metrics, indent=2))
    if task.name == "squad":
        print(f"no-answer threshold applied: {na_threshold:g}; the official script gives the same from the files: "
              f"python -m peft_t5.metrics.squad_v2 {data} {out} -n {out.with_name(out.stem + '.na_prob.json')} "
              f"-t {na_threshold!r}")
