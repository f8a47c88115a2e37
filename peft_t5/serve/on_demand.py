"""Adapters loaded at run time, from folders under --adapter_root only: by `POST /v1/adapters`, or on demand when a
request names a folder there that is not loaded. `--max_loaded_adapters` bounds how many are held: to make room, the
least recently used adapter that is not pinned (named at start, or rated) and has no row in flight or request
holding it is unloaded. Loads and unloads run on the engine's model thread, between two steps.

    adapters = OnDemand(bank, engine, root="adapters", most=16, pinned={"jokes"})
    async with adapters.holding("squad_v3"):     # loaded if need be; not evicted while held
        await engine.complete(["squad_v3"], ...)
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path

from ..bank import BASE, AdapterBank
from ..errors import NotFoundError, PeftT5Error
from .schemas import ADAPTER_NAME, ApiError


class OnDemand:
    def __init__(self, bank: AdapterBank, engine, root: str | None, most: int | None = None,
                 pinned: set[str] = frozenset(), trust_pickle: bool = False, metrics=None, wait: float = 30.0):
        self.bank, self.engine, self.root, self.most, self.wait = bank, engine, root, most, wait
        self.pinned, self.trust_pickle, self.metrics = set(pinned), trust_pickle, metrics
        self.used: OrderedDict[str, None] = OrderedDict((name, None) for name in bank.metadata)  # least recent first
        self.held: dict[str, int] = {}  # requests holding an adapter (from before their rows are queued)
        self.loading: dict[str, asyncio.Future] = {}  # loads in progress, awaited by every request for that name

    def on_disk(self) -> list[str]:
        """Adapter folders directly under the root that a request may name and that would load (loaded or not)."""
        if self.root is None:
            return []
        try:
            names = sorted(p.name for p in Path(self.root).iterdir()
                           if ADAPTER_NAME.match(p.name) and p.name != BASE and (p / "adapter_config.json").is_file())
        except OSError:
            return []
        return [name for name in names if name in self.bank.metadata or self.problem(name) is None]

    def kind_on_disk(self, name: str) -> str | None:
        """The kind (extractive or generative) of an adapter folder under the root, from its peft_t5.json; None where
        there is no such folder or it cannot be read (a request naming it is answered why)."""
        from ..adapters import read_metadata
        from ..bank import adapter_kind

        if self.root is None or not ADAPTER_NAME.match(name) or not (Path(self.root) / name).is_dir():
            return None
        try:
            return adapter_kind(read_metadata(inside_root(self.root, name), self.trust_pickle))
        except (ApiError, PeftT5Error):
            return None

    def problem(self, name: str) -> ApiError | None:
        """Why a folder under the root would not load (what a request naming it would be answered), read from its
        files without loading it; None if it would, as far as they tell."""
        from ..adapters import check_adapter_dir

        try:
            path = inside_root(self.root, name)
            check_adapter_dir(path, self.trust_pickle)
        except ApiError as e:
            return ApiError(e.status, f"adapter {name!r}: {e.message.removeprefix('path: ')}")
        except PeftT5Error as e:
            status = 404 if isinstance(e, NotFoundError) else 422
            return ApiError(status, f"adapter {name!r} could not be loaded from the adapter root: {e}")
        return None

    @asynccontextmanager
    async def holding(self, *names: str | None, field: str = "model"):
        """Each named adapter loaded (if it is a folder under the root and not loaded yet) and kept loaded while the
        block runs. Names that are neither loaded nor on disk pass through: the route says they do not exist."""
        names = [n for n in dict.fromkeys(names) if n and n != BASE]
        for name in names:
            self.held[name] = self.held.get(name, 0) + 1
        try:
            for name in names:
                try:
                    await self.ensure(name)
                except ApiError as e:
                    raise ApiError(e.status, e.message, field) from None
            yield
        finally:
            for name in names:
                self.held[name] -= 1
                if not self.held[name]:
                    del self.held[name]

    async def ensure(self, name: str) -> None:
        if name in self.bank.metadata:
            self.used.move_to_end(name, last=True) if name in self.used else self.used.setdefault(name)
            return
        if self.root is None or not ADAPTER_NAME.match(name) or not (Path(self.root) / name).is_dir():
            return
        if name not in self.loading:  # concurrent first requests share one load
            self.loading[name] = asyncio.ensure_future(self._load(name))
            self.loading[name].add_done_callback(lambda _: self.loading.pop(name, None))
        await asyncio.shield(self.loading[name])

    async def _load(self, name: str) -> None:
        try:
            path = inside_root(self.root, name)
        except ApiError as e:
            raise ApiError(e.status, f"adapter {name!r}: {e.message.removeprefix('path: ')}") from None
        started = time.perf_counter()
        try:
            await self.load(name, str(path))
        except PeftT5Error as e:
            status = 404 if isinstance(e, NotFoundError) else 503 if isinstance(e, Full) else 422
            raise ApiError(status, f"adapter {name!r} could not be loaded from the adapter root: {e}")
        if self.metrics is not None:
            self.metrics.adapter_loaded(time.perf_counter() - started)

    async def load(self, name: str, path: str) -> dict:
        """Load a folder (already confined to the root) as `name`, making room first (waiting up to `wait` seconds
        for an adapter to fall idle); its metadata."""
        deadline = time.monotonic() + self.wait
        while True:
            try:
                meta = await self.engine.on_model_thread(self._make_room_and_load, name, path)
                break
            except Full:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self.used[name] = None
        return meta

    def _make_room_and_load(self, name: str, path: str) -> dict:
        """On the model thread, between steps: evict what must go, then load."""
        if self.most is not None and name not in self.bank.metadata:  # a name taken: bank.add refuses, nothing goes
            while len(self.bank.metadata) >= self.most:
                self.evict_one()
        return self.bank.add(name, path, self.trust_pickle)

    def evict_one(self) -> str:
        """Unload the least recently used adapter that is not pinned, not held, and has no row in the engine."""
        busy = self.engine.adapters_in_flight()
        for name in list(self.used):
            if name in self.bank.metadata and name not in self.pinned and name not in self.held and name not in busy:
                self.bank.remove(name)
                del self.used[name]
                if self.metrics is not None:
                    self.metrics.adapter_evicted()
                return name
        raise Full(f"all {len(self.bank.metadata)} loaded adapters (--max_loaded_adapters {self.most}) stayed pinned "
                   f"or in use for {self.wait:g} s; retry shortly")

    def forget(self, name: str) -> None:
        """An adapter unloaded by DELETE /v1/adapters."""
        self.used.pop(name, None)



class Full(PeftT5Error):
    """No loaded adapter may be evicted to make room."""


def inside_root(root: str, path: str) -> Path:
    """The folder `path` names under `root`, refused if it, or any file in it, resolves (symlinks followed)
    outside the root."""
    if "\x00" in path or any(len(os.fsencode(part)) > 255 for part in Path(path).parts):
        raise ApiError(404, "path: no such adapter folder (no path holds a NUL byte or a name over 255 bytes); give "
                            "a folder under the adapter root", "path")
    base = Path(root).resolve()
    try:
        target = (base / path).resolve()
        outside = [target] if not target.is_relative_to(base) else \
            [p for p in (target.rglob("*") if target.is_dir() else ()) if not p.resolve().is_relative_to(base)]
    except (OSError, RuntimeError) as e:  # a loop of links, a name too long for the file system
        raise ApiError(422, f"path: {path[:100]!r} cannot be resolved ({type(e).__name__}); give a folder under the "
                            "adapter root", "path")
    if outside:
        what = "" if outside[0] == target else f" (its {outside[0].relative_to(target)} links out)"
        raise ApiError(403, f"path: {path!r} is outside the adapter root{what}; give a folder under it", "path")
    return target
