"""Save an adapter folder atomically, read its metadata, load it onto a base with plain PEFT."""
from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from .errors import NotFoundError, PeftT5Error
from .metadata import check_adapter_config, check_metadata

METADATA_FILE = "peft_t5.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer*", "spiece.model", "special_tokens_map.json", "added_tokens.json")
# what a save of each kind writes: replaced by the next save even where it writes no file of that name
ADAPTER_OWNS = ("adapter_config.json", "adapter_model.*", *TOKENIZER_FILES, METADATA_FILE, "README.md", "loss_curve.png")
MODEL_OWNS = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
              *TOKENIZER_FILES, METADATA_FILE)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    # No library exposes renameat2; it is the only way to replace a non-empty folder in one step.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (AttributeError, OSError):
        return False


def write_atomically(output_dir: Path, write, owns: tuple[str, ...] = ADAPTER_OWNS) -> None:
    """Call write(tmp_dir) on a fresh folder beside output_dir, then swap it in as output_dir in one step.

    Of the old folder, only what the new save writes, or what matches `owns` (the names a save of this kind
    writes), is replaced: everything else (training checkpoints and logs, the user's own files) carries over
    as hard links. A kill at any moment leaves output_dir holding either the whole old folder or the whole new one.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_interrupted_saves(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.saving-{os.getpid()}-", dir=output_dir.parent))
    try:
        write(tmp)
        apply_umask(tmp)
        for old in output_dir.iterdir() if output_dir.is_dir() else ():
            if (tmp / old.name).exists() or matches(old.name, owns):
                continue
            if old.is_dir() and not old.is_symlink():
                shutil.copytree(old, tmp / old.name, copy_function=os.link, symlinks=True)
            else:
                os.link(old, tmp / old.name, follow_symlinks=False)
        if not output_dir.exists():
            os.rename(tmp, output_dir)
        elif _exchange(tmp, output_dir):
            shutil.rmtree(tmp)
        else:  # no atomic exchange here: two renames, the old folder kept until the new one is in place
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.rename(output_dir, old)
            os.rename(tmp, output_dir)
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable_folder(path: str | Path, flag: str) -> None:
    """Refuse, before anything is written, a target that is a file, lies under one, or lies where no folder can be
    made (its nearest existing folder is tried with a folder made and removed at once)."""
    path = Path(path)
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            where = "is a file" if part == path else f"lies under {part}, a file"
            raise PeftT5Error(f"{flag} {path}: {where}; pass a folder path")
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".peft-t5-probe-").cleanup()
    except OSError as e:
        raise PeftT5Error(f"{flag} {path}: cannot write in {existing} ({e.strerror}); pass a folder you can write to")


def remove_interrupted_saves(output_dir: Path) -> None:
    """Delete the temporary folders of saves to output_dir whose process is gone (killed mid-save)."""
    for stale in output_dir.parent.glob(f".{output_dir.name}.saving-*"):
        pid = stale.name.removeprefix(f".{output_dir.name}.saving-").split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def apply_umask(folder: Path) -> None:
    """mkdtemp makes the folder 700: give it, and what is in it, the user's usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def save_adapter(model, tokenizer, output_dir: str | Path, metadata: dict, model_card: str,
                 extra_files: dict[str, Path] | None = None, state_dict: dict | None = None,
                 initial_adapter: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (plain PEFT), tokenizer, metadata and model card.

    state_dict: the model's full state dict where training sharded it (see training.gathered_state_dict).
    initial_adapter: a PiSSA or OLoRA adapter as it started (save_initial_adapter): it is saved as plain LoRA."""
    options = {"state_dict": state_dict} if state_dict else {}
    if initial_adapter:
        options["path_initial_model_for_weight_conversion"] = initial_adapter

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():  # PEFT's conversion loads the initial adapter beside the trained one
            warnings.filterwarnings("ignore", message=r"(PiSSA|OLoRA) changes the base weights")
            model.save_pretrained(tmp, safe_serialization=True, **options)
        write_beside_weights(tmp, tokenizer, metadata, model_card, extra_files)

    write_atomically(Path(output_dir), write)


def save_model_folder(model, tokenizer, output_dir: str | Path, metadata: dict, model_card: str,
                      extra_files: dict[str, Path] | None = None, state_dict: dict | None = None) -> None:
    """A whole model (full fine-tuning): config, model.safetensors, tokenizer, metadata and model card, a folder
    plain from_pretrained loads and --model/--base take."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        write_beside_weights(tmp, tokenizer, metadata, model_card, extra_files)

    write_atomically(Path(output_dir), write, owns=(*MODEL_OWNS, "README.md", "loss_curve.png"))


def write_beside_weights(folder: Path, tokenizer, metadata: dict, model_card: str,
                         extra_files: dict[str, Path] | None) -> None:
    """The tokenizer, peft_t5.json, the model card and extra files (the loss curve) of a save."""
    tokenizer.save_pretrained(folder)
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(model_card, encoding="utf-8")
    for name, src in (extra_files or {}).items():
        if Path(src).exists():
            shutil.copy(src, folder / name)


def save_initial_adapter(model, held: contextlib.ExitStack) -> str:
    """PiSSA and OLoRA start LoRA from the base's principal (or orthonormal) directions and take them out of the base
    weights, so the adapter as trained fits only that changed base: loaded, it changes the weights of the base it is
    put on, under every other adapter there. PEFT converts it at save into a plain LoRA adapter (twice the rank) for
    the original base, given the adapter as it started: written here, to a folder that lives as long as `held`."""
    folder = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="peft-t5-"))) / "initial"
    config = model.peft_config["default"]
    started_as, config.init_lora_weights = config.init_lora_weights, True  # as PEFT's conversion requires
    try:
        model.save_pretrained(folder)
    finally:
        config.init_lora_weights = started_as
    return str(folder)


def foreign_files(folder: str | Path, owns: tuple[str, ...] = ADAPTER_OWNS) -> list[str]:
    """The entries of a folder that no save of the toolkit wrote (training also writes checkpoints/ and runs/)."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if not matches(p.name, (*owns, "checkpoints", "runs"))) \
        if folder.is_dir() else []


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def is_adapter_dir(path: str | Path) -> bool:
    return all((Path(path) / f).is_file() for f in ADAPTER_FILES)


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and any(Path(path).glob("model*.safetensors"))


def check_adapter_dir(adapter_dir: str | Path, trust_pickle: bool = False) -> None:
    """An adapter folder PEFT can load: a valid adapter_config.json and safetensors weights (or, with
    trust_pickle, a pickled adapter_model.bin)."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise NotFoundError(f"{path}: no such adapter folder; pass the folder that train_lora.py wrote")
    if not (path / "adapter_config.json").is_file():
        raise NotFoundError(f"{path}: no adapter_config.json, so not an adapter folder; pass the folder that "
                          "train_lora.py wrote")
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict) or "peft_type" not in config:
            raise ValueError("no peft_type")
    except (UnicodeDecodeError, ValueError) as e:
        raise PeftT5Error(f"{path}/adapter_config.json: not a PEFT adapter config ({e}); copy the adapter again")
    check_adapter_config(config, path / "adapter_config.json")
    if (path / "adapter_model.safetensors").is_file():
        check_weights_kind(path, config["peft_type"], adapter_shapes(path))  # a truncated file fails in the read
    elif (path / "adapter_model.bin").is_file():
        if not trust_pickle:
            raise PeftT5Error(f"{path}/adapter_model.bin: pickled weights can run code when loaded and are refused; "
                              "convert them to safetensors, or pass --trust_pickle if you trust their source")
    else:
        raise PeftT5Error(f"{path}: no adapter_model.safetensors, so no adapter weights; pass the folder that "
                          "train_lora.py wrote")


@contextlib.contextmanager
def quiet_adalora_warnings(is_adalora: bool = True):
    """PEFT warns, wrongly for AdaLoRA, that a layer whose rank AdaLoRA pruned to 0 is an ungathered ZeRO-3 shard
    (on save), and that the saved rank pattern was ignored (on load, which applies it afterwards)."""
    with warnings.catch_warnings():
        if is_adalora:
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            warnings.filterwarnings("ignore", message=r"The following rank_pattern keys did not match")
        yield


# a tensor every adapter of a PEFT type holds, by a part of its name; check_adapter_keys checks every key at load
KIND_MARKS = {"LORA": "lora_A", "ADALORA": "lora_E", "IA3": "ia3_l", "PROMPT_TUNING": "prompt_embeddings",
              "VERA": "vera_lambda_b"}


def check_weights_kind(path: Path, peft_type: str, shapes: dict) -> None:
    """The weights are of the PEFT type the config names, read from the file's header alone (a folder whose config
    was copied from an adapter of another method would load as the bare base)."""
    mark = KIND_MARKS.get(peft_type)
    if mark and shapes and not any(mark in key for key in shapes):
        raise PeftT5Error(f"{path}: adapter_model.safetensors does not hold the weights its adapter_config.json "
                          f"({peft_type.lower()}) makes: missing every *{mark}* tensor (it holds "
                          f"{sorted(shapes)[0]}, ...); copy the adapter folder again, its config and weights together")


def peft_from_pretrained(model, adapter_dir: str | Path, **kwargs):
    """PeftModel.from_pretrained, without PEFT's false AdaLoRA warnings, refused unless the weights file holds
    exactly the tensors the adapter's config makes."""
    from peft import PeftModel

    with quiet_adalora_warnings(adapter_method(adapter_dir).name == "adalora"):
        loaded = PeftModel.from_pretrained(model, adapter_dir, **kwargs)
    check_adapter_keys(loaded, kwargs.get("adapter_name", "default"), adapter_dir)
    return loaded


def check_adapter_keys(peft_model, adapter_name: str, adapter_dir: str | Path) -> None:
    """The adapter's weights file holds exactly the tensors its adapter_config.json makes. PEFT loads the tensors that
    match and leaves the rest as initialised (an IA3 config over LoRA weights answers as the bare base), with a
    warning at most."""
    from peft import get_peft_model_state_dict

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return  # pickled weights the user chose to trust: PEFT's own warning is all there is
    expected = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    found = set(tensor_shapes(weights))
    missing, unknown = sorted(expected - found), sorted(found - expected)
    if missing or unknown:
        config = peft_model.peft_config[adapter_name]
        said = (f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                if missing else f"{unknown[0]} is not one of its tensors")
        raise PeftT5Error(f"{adapter_dir}: adapter_model.safetensors does not hold the weights its adapter_config.json "
                          f"({config.peft_type.value.lower()}) makes: {said}; copy the adapter folder again, its "
                          "config and weights together")


@contextlib.contextmanager
def adapter_snapshot(adapter_dir: str | Path):
    """A private copy of the files a load reads (config, weights, metadata, tokenizer), taken once: the folder may
    change while it loads (a copy, a deletion, a rewrite), and every check and the load then read one version.
    A file that goes away during the copy is a NotFoundError naming it."""
    source = Path(adapter_dir)
    if not source.is_dir():
        raise NotFoundError(f"{source}: no such adapter folder; pass the folder that train_lora.py wrote")
    with tempfile.TemporaryDirectory(prefix="peft-t5-adapter-") as tmp:
        copy = Path(tmp) / source.name
        copy.mkdir()
        names = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", METADATA_FILE]
        try:
            names += [p.name for pattern in TOKENIZER_FILES for p in source.glob(pattern)]
            for name in dict.fromkeys(names):
                try:
                    shutil.copyfile(source / name, copy / name)
                except FileNotFoundError:
                    if name == "adapter_config.json":
                        raise NotFoundError(f"{source}: no adapter_config.json, so not an adapter folder (or it went "
                                            "away while it was read); pass the folder that train_lora.py wrote")
        except IsADirectoryError as e:
            raise PeftT5Error(f"{source}: {Path(e.filename).name} is a folder, not a file; pass the folder that "
                              "train_lora.py wrote")
        except NotFoundError:
            raise
        except OSError as e:
            raise NotFoundError(f"{source}: cannot be read ({e.strerror}); pass the folder that train_lora.py wrote")
        try:
            yield copy
        except PeftT5Error as e:  # said of the folder the user named, not of the copy
            raise type(e)(str(e).replace(str(copy), str(source))) from None


def check_keeps_base(adapter_dir: str | Path) -> None:
    """Refuse a PiSSA / OLoRA adapter saved for the base it changed: loading it changes the base's weights."""
    init = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8")).get("init_lora_weights")
    if isinstance(init, str) and init.split("_")[0] in ("pissa", "olora", "corda"):
        raise PeftT5Error(f"{adapter_dir}: a {init} adapter saved for the base it changed (adapter_config.json: "
                          f"init_lora_weights {init!r}); loading it would change the weights under the base and "
                          "every other adapter; save it as plain LoRA (PEFT's save_pretrained with "
                          "path_initial_model_for_weight_conversion, as peft-t5's training does) and load that")


def adapter_method(adapter_dir: str | Path):
    """The PEFT method (methods.Method) of a saved adapter, from its adapter_config.json."""
    from .methods import method_of

    return method_of(json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8")))


def read_metadata(adapter_dir: str | Path, trust_pickle: bool = False) -> dict:
    """The adapter's peft_t5.json (task, base, template, ...), after checking the folder is a loadable adapter."""
    check_adapter_dir(adapter_dir, trust_pickle)
    meta = Path(adapter_dir) / METADATA_FILE
    try:
        data = json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}
    except (UnicodeDecodeError, ValueError) as e:
        raise PeftT5Error(f"{meta}: not valid JSON ({e}); restore it, or delete it and pass --base explicitly")
    return check_metadata(data, meta)


def adapter_shapes(adapter_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in adapter_model.safetensors, read from its header without loading the weights."""
    return tensor_shapes(Path(adapter_dir) / "adapter_model.safetensors")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a safetensors file, read from its header without loading the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PeftT5Error(f"{path}: truncated or corrupt safetensors file ({e}); train or copy the adapter again")


def check_adapter_fits(base_model, adapter_dir: str | Path, base_name: str) -> None:
    """Refuse, naming both, an adapter whose LoRA matrices do not fit the base's layers."""
    recorded = read_metadata(adapter_dir, trust_pickle=True).get("base_model", "unknown")
    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        return  # a pickled adapter the user chose to trust: PEFT checks its shapes on load
    modules = dict(base_model.named_modules())
    for key, shape in adapter_shapes(adapter_dir).items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        path = key.split(".lora_")[0].removeprefix("base_model.model.")
        module = modules.get(path)
        expected = None if module is None else (module.in_features if ".lora_A." in key else module.out_features)
        got = shape[1] if ".lora_A." in key else shape[0]
        if expected != got:
            has = "no such layer" if module is None else f"{expected} features"
            raise PeftT5Error(f"{adapter_dir}: adapter trained on base '{recorded}' does not fit base '{base_name}' "
                              f"({path}: adapter expects {got} features, base has {has}); "
                              f"load it onto '{recorded}' or a copy of it")
