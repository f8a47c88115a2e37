"""One base model in memory, several named adapters on it: switch between tasks without reloading the base.

    bank = AdapterBank.load("t5-small", {"squad": "adapters/squad", "jokes": "adapters/jokes"})
    bank.generate("jokes", ["Why did the scarecrow win an award?"])
    bank.generate("squad", [("Where is Normandy?", "Normandy is a region in France.")])
    bank.generate("base", questions, prompt_of="jokes")   # adapters disabled, jokes' prompt, for comparison
    bank.generate_mixed([("jokes", q1), ("squad", (q2, c2))])   # one forward pass, PEFT's adapter_names
    bank.answer_spans("spans", [{"question": q, "context": c}])   # an extractive adapter: spans of the context

Adapters of several PEFT methods share the base: one PeftModel holds each method's adapters (LoRA and DoRA are one
type; each AdaLoRA adapter gets its own), each over a module tree of its own whose layers are the base's very layers.
Extractive adapters (squad_extractive) are held by PeftModels over a T5ForQuestionAnswering tree of those same
layers, their span heads (qa_outputs) their own.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from .adapters import (
    adapter_method,
    adapter_snapshot,
    check_adapter_fits,
    check_adapter_keys,
    check_keeps_base,
    quiet_adalora_warnings,
    read_metadata,
)
from .errors import ConflictError, PeftT5Error
from .generation import generate_texts, no_answer_probs
from .tasks import Task, get_task, template_fields

BASE = "base"
PEFT_BASE = "__base__"  # PEFT's adapter_names entry for a row with no adapter


@dataclass
class AdapterBank:
    model: object  # the PeftModel holding the first adapter and every other of its PEFT type
    tokenizer: object
    metadata: dict[str, dict] = field(default_factory=dict)  # adapter name -> its peft_t5.json
    base_name: str = "model"  # the base as given (Hub id, folder, tiny)
    methods: dict[str, object] = field(default_factory=dict)  # adapter name -> its methods.Method
    holders: dict[str, object] = field(default_factory=dict)  # adapter name -> the PeftModel holding it
    base: object = None  # the base with no adapter; its layers are those every holder wraps
    base_meta: dict = field(default_factory=dict)  # a whole fine-tuned model's peft_t5.json (its task and prompt)

    @classmethod
    def load(cls, base, adapters: dict[str, str], qlora: bool = False, trust_pickle: bool = False,
             dtype: str = "float32") -> "AdapterBank":
        """base: a Hub id, folder or `tiny` (None: the base recorded in the first adapter), or a loaded model;
        dtype: the base's weights when it is loaded here (float32 or bfloat16)."""
        from transformers import AutoTokenizer

        from .modeling import load_base_model, load_tokenizer

        if not adapters and base is None:
            raise PeftT5Error("no adapters given; pass at least one name=folder, or a model to serve alone")
        if BASE in adapters:
            raise PeftT5Error(f"'{BASE}' is reserved for the model with adapters disabled; name the adapter otherwise")
        first = next(iter(adapters), None)
        meta, tokenizer = {}, None
        if first is not None:
            with adapter_snapshot(adapters[first]) as snapshot:
                meta = read_metadata(snapshot, trust_pickle)
                tokenizer = AutoTokenizer.from_pretrained(snapshot)
        base_name = base if isinstance(base, str) else getattr(getattr(base, "config", None), "name_or_path", "model")
        if base is None:
            base_name = meta.get("base_model")
            if not base_name:
                raise PeftT5Error(f"{adapters[first]}: no base model recorded; pass the base explicitly")
        metas = {name: read_metadata(path, trust_pickle) for name, path in adapters.items()}  # all checked first
        base_meta = model_metadata(base_name)
        if isinstance(base_name, str) and adapter_kind(base_meta) == "extractive":
            raise PeftT5Error(f"{base_name}: a merged extractive (span) model answers by span, and the server serves it "
                              "through its adapter: pass --model with the base it was trained on and --adapter with "
                              "the adapter folder")
        import torch

        model = (load_base_model(base_name, qlora=qlora, trust_pickle=trust_pickle, dtype=getattr(torch, dtype))
                 if isinstance(base, str) or base is None else base)
        model.eval()
        bank = cls(None, tokenizer or load_tokenizer(base_name), base_name=base_name, base=shared_layers(model),
                   base_meta=base_meta)
        first_generative = next((n for n, meta in metas.items() if adapter_kind(meta) == "generative"), None)
        for name, path in adapters.items():
            bank.add(name, path, trust_pickle, onto=model if name == first_generative else None)
        return bank

    def add(self, name: str, path: str, trust_pickle: bool = False, onto=None) -> dict:
        """Load another adapter folder onto the loaded base, after checking it fits; returns its metadata. The folder
        is read once, into a private copy, so that it may change meanwhile; a folder that does not load leaves
        nothing behind. onto: the base model to wrap, for the first adapter."""
        if name == BASE or name in self.metadata:
            raise ConflictError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        with adapter_snapshot(path) as snapshot:
            meta = read_metadata(snapshot, trust_pickle)
            self.attach(name, str(snapshot), meta, adapter_method(snapshot), onto)
        return meta

    def attach(self, name: str, path: str, meta: dict, method, onto=None) -> None:
        """Load an adapter into the PeftModel of its PEFT type, or into a new one over the same layers (onto: the
        base model to wrap, else a new module tree sharing the base's layers); undone if it fails."""
        from peft import PeftModel

        check_keeps_base(path)
        check_adapter_fits(self.base, path, self.base_name)
        spans = adapter_kind(meta) == "extractive"
        if spans and method.name not in SPAN_METHODS:
            raise PeftT5Error(f"{path}: an extractive adapter of method {method.name} cannot be served; train it with "
                              f"one of {', '.join(SPAN_METHODS)}")
        key = holder_key(name, method) + (":span" if spans else "")
        holder = next((self.holders[n] for n in self.metadata
                       if holder_key(n, self.methods[n]) + (":span" if self.kind(n) == "extractive" else "") == key),
                      None)
        if spans:
            onto = span_tree(self.base)
        inner = peft_name(name, method)
        try:
            with quiet_adalora_warnings(method.name == "adalora"):
                if holder is not None:
                    holder.load_adapter(path, adapter_name=inner)
                    loaded = holder
                else:
                    loaded = PeftModel.from_pretrained(onto if onto is not None else shared_layers(self.base), path,
                                                       adapter_name=inner).eval()
            check_adapter_keys(loaded, inner, path)
        except Exception as e:
            if holder is not None and inner in holder.peft_config:
                holder.delete_adapter(inner)  # what was loaded of it goes; a new holder goes with this frame
            if isinstance(e, PeftT5Error):
                raise
            raise PeftT5Error(f"{path}: PEFT could not load it ({type(e).__name__}: {' '.join(str(e).split())[:300]});"
                              " pass the folder that train_lora.py wrote") from None
        if not spans:
            self.model = self.model or loaded
        self.metadata[name], self.methods[name], self.holders[name] = meta, method, loaded

    @property
    def names(self) -> list[str]:
        return [BASE, *self.metadata]

    def kind(self, name: str) -> str:
        """"extractive" (it answers by span: answer_spans) or "generative" (the base, and every other adapter)."""
        return adapter_kind(self.base_meta if name == BASE else self.metadata.get(name, {}))

    def span_records(self, name: str, inputs: list) -> list[dict]:
        """An extractive adapter's inputs as records: each a {question, context} dict, or a (question, context)
        pair."""
        records = []
        for i, item in enumerate(inputs):
            if isinstance(item, (tuple, list)) and len(item) == 2:
                item = dict(zip(("question", "context"), item))
            if not isinstance(item, dict) or not all(isinstance(item.get(f), str) for f in ("question", "context")):
                raise PeftT5Error(f"inputs[{i}]: {name!r} is an extractive adapter: it answers a question about a "
                                  "context with a span of it; send {question, context}")
            records.append({"question": item["question"], "context": item["context"], "answers": [],
                            "answer_starts": []})
        return records

    def span_options(self, name: str) -> dict:
        """How an extractive adapter reads its inputs, as it was trained: window length, stride, longest answer."""
        meta = self._meta(name)
        return {"max_length": self.source_limit(name), "doc_stride": int(meta.get("doc_stride") or 128),
                "max_answer_length": int(meta.get("max_answer_length") or 30)}

    def answer_spans(self, name: str, inputs: list, na_threshold: float | None = None,
                     batch_size: int = 16) -> list[str]:
        """An extractive adapter's answers, spans of each input's context, "" where the null score beats the best
        span by more than na_threshold (default: the threshold recorded in training, else 0): one forward pass per
        batch of windows, as evaluate.py answers."""
        from .extractive import answer_records

        records = self.span_records(name, inputs)
        spans = answer_records(self.model_for(name), self.tokenizer, records, batch_size=batch_size,
                               **self.span_options(name))
        return [s.answer(self.span_threshold(name, na_threshold)) for s in spans]

    def span_threshold(self, name: str, given: float | None = None) -> float:
        recorded = self._meta(name).get("na_threshold")
        return given if given is not None else recorded if recorded is not None else 0.0

    def sources(self, name: str, inputs: list, prompt_of: str | None = None) -> list[str]:
        """Prompts from the adapter's saved template: a string fills the one field, a tuple fills them in order.

        For `base`, the template of adapter `prompt_of`; with none given, that of a whole fine-tuned model (its
        peft_t5.json), else string inputs are used as they are.
        """
        if name == BASE and prompt_of is None and self.base_meta.get("template"):
            return self._fill(BASE, self.base_meta["template"], inputs)
        if name == BASE and prompt_of is None:
            if not all(isinstance(item, str) for item in inputs):
                raise PeftT5Error(f"{BASE} without prompt_of takes text inputs only; pass prompt_of=ADAPTER to fill "
                                  "that adapter's prompt from these fields")
            return list(inputs)
        return self._fill(name, self._meta(prompt_of if name == BASE else name).get("template", "{question}"), inputs)

    def _fill(self, name: str, template: str, inputs: list) -> list[str]:
        fields = template_fields(template)
        records = []
        for item in inputs:
            if isinstance(item, str):
                item = (item,)
            record = item if isinstance(item, dict) else dict(zip(fields, item))
            missing = [f for f in fields if f not in record]
            if missing:
                raise PeftT5Error(f"{name}: its prompt `{template}` needs {', '.join(fields)}; missing {', '.join(missing)}")
            records.append(record)
        return [template.format(**r) for r in records]

    def _meta(self, name: str) -> dict:
        if name not in self.metadata:
            raise PeftT5Error(f"no adapter named {name!r}; loaded: {', '.join(self.names)}")
        return self.metadata[name]

    def answer(self, name: str, output: str, raw: bool = False) -> str:
        """The task's answer in a generated text (squad: its no-answer word becomes "")."""
        return output if raw else self.answerer(name)(output)

    def empty_output(self, name: str) -> str:
        """How the adapter's task shows an empty answer: "(no answer)" for squad, "(empty output)" otherwise."""
        task = (self.base_meta if name == BASE else self.metadata.get(name, {})).get("task")
        return get_task(task).empty_output if task else Task.empty_output

    def answerer(self, name: str):
        """answer() for adapter `name`, bound now: it keeps working if the adapter is unloaded meanwhile."""
        task = self.base_meta.get("task") if name == BASE else self._meta(name).get("task")
        return get_task(task).answer_from_output if task else (lambda output: output)

    def generate(self, name: str, inputs: list | str, prompt_of: str | None = None, raw: bool = False,
                 na_threshold: float | None = None, **kwargs) -> list[str]:
        """Answers from adapter `name` (or `base`), the prompt template applied from its metadata: one per input (a
        string is one input).

        An adapter of a task with a no-answer target (squad) answers "" where its no-answer probability is over
        na_threshold (default: the threshold recorded in training, where there is one)."""
        if self.kind(name) == "extractive":
            return self.answer_spans(name, [inputs] if isinstance(inputs, (str, dict)) else inputs, na_threshold)
        sources = self.sources(name, [inputs] if isinstance(inputs, str) else inputs, prompt_of)
        outputs = self.generate_switched(name, sources, **kwargs)
        meta = self.base_meta if name == BASE else self.metadata[name]
        if raw or name == BASE and (prompt_of is not None or not meta.get("task")):
            return outputs
        answers = [self.answer(name, o) for o in outputs]
        task = get_task(meta["task"]) if meta.get("task") else None
        threshold = na_threshold if na_threshold is not None else meta.get("na_threshold")
        if task is None or not task.no_answer or threshold is None or threshold >= 1.0:
            return answers
        options = {k: v for k, v in kwargs.items() if k in ("batch_size", "max_new_tokens")}
        probs = no_answer_probs(self.base if name == BASE else self.holders[name], self.tokenizer, sources, outputs,
                                task.no_answer, max_source_length=self.source_limit(name), **options)
        return ["" if p > threshold else a for a, p in zip(answers, probs)]

    def generate_switched(self, name: str, sources: list[str], **kwargs) -> list[str]:
        """Raw outputs for ready-made prompts, `name` made the active adapter (or adapters disabled for `base`)."""
        kwargs.setdefault("max_source_length", self.source_limit(name))
        if name == BASE:
            return generate_texts(self.base, self.tokenizer, sources, **kwargs)
        self._meta(name)
        self.holders[name].set_adapter(peft_name(name, self.methods[name]))
        return generate_texts(self.holders[name], self.tokenizer, sources, **kwargs)

    def generate_mixed(self, items: list[tuple[str, object]], raw: bool = False, **kwargs) -> list[str]:
        """A batch that mixes adapters, run in the same forward passes: each example through its own adapter."""
        names = [name for name, _ in items]
        outputs = self.generate_sources(names, [self.sources(name, [item])[0] for name, item in items], **kwargs)
        return [self.answer(n, o, raw) for n, o in zip(names, outputs)]

    def generate_sources(self, names: list[str], sources: list[str], **kwargs) -> list[str]:
        """Raw outputs for ready-made prompts, source i through adapter names[i], each truncated as it was trained:
        adapters PEFT mixes per row (LoRA, with base) in one batch, every other adapter in a sub-batch of its own."""
        mixed = {n for n in names if n == BASE or n in self.methods and self.methods[n].mixed_batches}
        if len(mixed) < 2:
            mixed = set()
        batches = [mixed] if mixed else []
        return self._by_sub_batch(names, sources, batches + [{n} for n in dict.fromkeys(names) if n not in mixed],
                                  **kwargs)

    def generate_per_adapter(self, names: list[str], sources: list[str], **kwargs) -> list[str]:
        """Raw outputs, one sub-batch per adapter (each made active in turn), in the order of `sources`."""
        return self._by_sub_batch(names, sources, [{n} for n in dict.fromkeys(names)], **kwargs)

    def _by_sub_batch(self, names: list[str], sources: list[str], batches: list[set[str]], **kwargs) -> list[str]:
        outputs = [""] * len(sources)
        for batch in batches:
            rows = [i for i, n in enumerate(names) if n in batch]
            for i, text in zip(rows, self._generate_batch([names[i] for i in rows], [sources[i] for i in rows],
                                                          **kwargs)):
                outputs[i] = text
        return outputs

    def _generate_batch(self, names: list[str], sources: list[str], **kwargs) -> list[str]:
        if len(set(names)) == 1:  # one adapter: PEFT's per-adapter sub-batches would only add overhead
            return self.generate_switched(names[0], sources, **kwargs)
        adapter_names = [self.peft_name(n) for n in names]
        kwargs.setdefault("max_source_length", [self.source_limit(n) for n in names])
        holder = self.holders[next(n for n in names if n != BASE)]
        return generate_texts(holder, self.tokenizer, sources, adapter_names=adapter_names, **kwargs)

    def model_for(self, name: str):
        """The PeftModel holding adapter `name`, with that adapter made active (to call it as PEFT's model)."""
        self._meta(name)
        self.holders[name].set_adapter(self.peft_name(name))
        return self.holders[name]

    def peft_name(self, name: str) -> str:
        """The adapter's name in its PeftModel (PEFT_BASE for the base)."""
        return peft_name(name, self.methods.get(name))

    def mixes(self, names: set[str]) -> bool:
        """Whether these adapters (and base) run in one batch (PEFT's adapter_names), or need one sub-batch each."""
        return all(self.methods[n].mixed_batches for n in names if n != BASE and n in self.methods)

    def source_limit(self, name: str) -> int:
        """The source length (tokens) the adapter (or a whole fine-tuned model) was trained with; else 512."""
        meta = self.base_meta if name == BASE else self.metadata.get(name, {})
        return int(meta.get("max_source_length") or 512)

    def remove(self, name: str) -> None:
        """Unload an adapter; the last one stays (PEFT needs one to hold the base)."""
        self._meta(name)
        if len(self.metadata) == 1:
            raise PeftT5Error(f"{name!r} is the only adapter loaded; load another before unloading it")
        inner = self.peft_name(name)
        holder = self.holders.pop(name)
        del self.metadata[name], self.methods[name]
        if any(h is holder for h in self.holders.values()):
            holder.delete_adapter(inner)
        elif holder is self.model:  # its last adapter: the holder goes, its layers stay with the others
            self.model = next((h for n, h in self.holders.items() if self.kind(n) == "generative"), None)

    def models(self) -> list:
        """The base and each PeftModel holding adapters: distinct module trees over the same layers."""
        return [self.base, *{id(h): h for h in self.holders.values()}.values()]


def model_metadata(name: str) -> dict:
    """A whole model folder's peft_t5.json (a full fine-tune records its task and prompt); {} for any other model."""
    import json
    from pathlib import Path

    path = Path(name) / "peft_t5.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise PeftT5Error(f"{path}: not valid JSON ({e}); restore it, or delete it") from None


def holder_key(name: str, method) -> str:
    """Adapters with the same key share one PeftModel: PEFT holds adapters of one type in one (LoRA and DoRA are one
    type), and of some methods (AdaLoRA) only one adapter."""
    return name if method.one_per_model else "lora" if method.name == "dora" else method.name


def peft_name(name: str, method=None) -> str:
    """The adapter's name inside its PeftModel: the user's name with every character but letters, digits and _
    written as -XX- (its code), and a - after it. PEFT's loader tells an adapter's keys apart by whether its name
    occurs in them, so a name inside a tuner's prefix ('pt' in 'prompt_tuning_', 'ra' in 'lora_') lost keys; no prefix
    holds a -. A module name cannot hold a '.'. AdaLoRA's rank pattern is matched the same way and it has a PeftModel
    of its own, so it keeps PEFT's default name there. The base (no adapter) is PEFT's __base__."""
    if name == BASE:
        return PEFT_BASE
    if method is not None and method.one_per_model:
        return "default"
    return re.sub(r"[^A-Za-z0-9_]", lambda m: f"-{ord(m[0]):x}-", name) + "-"


def shared_layers(model):
    """A new module tree over the same layers. PEFT adapts a model by replacing layers in their parent modules, and
    one PeftModel holds one PEFT type; copying the parents (every leaf layer kept as it is) gives each type its own
    tree to wrap, while the weights stay in memory once."""
    import itertools

    memo = {id(m): m for m in model.modules() if next(m.children(), None) is None}
    memo.update({id(t): t for t in itertools.chain(model.parameters(), model.buffers())})
    return copy.deepcopy(model, memo)


def adapter_kind(meta: dict) -> str:
    """An adapter's (or a whole model's) kind, from its peft_t5.json: "extractive" (a span head) or "generative"."""
    return "extractive" if meta.get("head") == "span" else "generative"


SPAN_METHODS = ("lora", "dora", "ia3", "adalora", "vera")  # PEFT's QUESTION_ANS adapters train their span head


def span_tree(base):
    """A T5ForQuestionAnswering over the base's own layers (shared_layers): what an extractive adapter wraps. Its
    qa_outputs never answers: the adapter's own (PEFT's modules_to_save) does."""
    import torch
    from transformers import T5ForQuestionAnswering

    tree = shared_layers(base)
    with torch.device("meta"):
        qa = T5ForQuestionAnswering(base.config)
    qa.shared, qa.encoder, qa.decoder = tree.shared, tree.encoder, tree.decoder
    weight = base.shared.weight
    qa.qa_outputs = torch.nn.Linear(base.config.d_model, qa.num_labels, device=weight.device,
                                    dtype=weight.dtype if weight.is_floating_point() else torch.float32)
    return qa.eval()
