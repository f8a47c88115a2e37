"""The output folder of a training run: the lock a run holds on it, which of its checkpoints are whole, and a full
disk while saving into it, in one line."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from .adapters import tensor_shapes
from .errors import PeftT5Error


@contextmanager
def output_lock(adapter_dir: Path):
    """Hold `.NAME.lock` beside the adapter folder for the whole run, with this process's id in it: a second run
    into the same folder is refused, naming the first. The kernel releases the lock of a process that dies."""
    import fcntl

    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    path = adapter_dir.parent / f".{adapter_dir.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise PeftT5Error(f"--output_dir {adapter_dir}: another training (process {owner}) is writing to it; wait "
                          "for it to end, or pass another --output_dir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What an interrupted save left out of a checkpoint folder, or None where it is whole."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable trainer_state.json"
    weights = next((checkpoint / f for f in ("adapter_model.safetensors", "model.safetensors")
                    if (checkpoint / f).exists()), checkpoint / "adapter_model.safetensors")  # an adapter, or full
    try:
        tensor_shapes(weights)
    except PeftT5Error:
        return f"no readable {weights.name}"
    return None


def checkpoints_newest_first(folder: Path) -> list[Path]:
    steps = {int(p.name.split("-")[1]): p for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()}
    return [steps[step] for step in sorted(steps, reverse=True)]


def newest_whole_checkpoint(folder: str | Path) -> Path | None:
    return next((c for c in checkpoints_newest_first(Path(folder)) if checkpoint_problem(c) is None), None)


def disk_full(error: BaseException | None) -> bool:
    """A full disk, as Python (ENOSPC), safetensors and tokenizers (Rust's 'os error 28') report it."""
    import errno

    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error) \
                or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def saving_into(folder: Path, model):
    """A full disk while checkpointing or saving becomes one line naming the folder and the space a save needs."""
    import shutil

    try:
        yield
    except Exception as e:
        if not disk_full(e):
            raise
        adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        raise PeftT5Error(f"{folder}: no space left on the device ({shutil.disk_usage(existing).free / 2**20:,.1f} MiB "
                          f"free); a checkpoint needs about {3 * adapter / 2**20:,.1f} MiB (adapter weights and "
                          "optimizer state), the adapter itself "
                          f"{adapter / 2**20:,.1f} MiB; free some space or pass --output_dir on another disk") from None
