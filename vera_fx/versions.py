"""The adapter set's flags, its state lock (forwards read, switches write) and the graph versions built per adapter
state: emitting a switch's nodes costs milliseconds per graph and torch.fx keeps every source it executed, so a
state seen before puts the built ``Graph`` and ``forward`` back, and a tree edited outside (gradient checkpointing)
drops its versions."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Optional

from torch.fx import GraphModule

from .compat import GeneratedCode, replace_with_copy

CONTAINER = "vera_fx_adapters"  # the attribute of every graph holding its adapter set (vera_fx/methods/base.py)


@dataclass
class AdapterFlags:
    """The adapter set's run-time state (never in ``gm.meta``); ``active`` None: every adapter; ``lowering`` None:
    ``auto``; ``folded``: the merge pass's originals."""

    active: Optional[list[str]] = None
    disabled: bool = False
    merged: dict[str, tuple[str, ...]] = field(default_factory=dict)
    folded: dict[str, Any] = field(default_factory=dict)
    lowering: Optional[dict[str, Any]] = None

    def key(self) -> tuple:
        """A hashable value that changes whenever the adapter nodes a graph carries change."""
        return (tuple(self.active) if self.active is not None else None, self.disabled,
                tuple(sorted((k, tuple(v)) for k, v in self.merged.items())), repr(self.lowering))


def adapter_flags(gm: Any) -> AdapterFlags:
    """The flags of ``gm``'s adapter set; a graph without adapters reads fresh defaults."""
    flags = getattr(getattr(gm, CONTAINER, None), "flags", None)
    return flags if flags is not None else AdapterFlags()


class StateLock:
    """A readers-writer lock: many forwards at once, one switch at a time, writers first. Reentrant, but a reading
    thread that writes would wait for itself: RuntimeError."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: Optional[int] = None
        self._write_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()
        self.version = 0  # bumped when a write ends: a reader that saw this value sees the same state

    def __reduce__(self) -> Any:  # a copy (deepcopy, pickle) is a fresh lock
        return (StateLock, ())

    def read(self) -> "StateLock":
        """``with lock.read():`` holds the state unchanged (the lock is its own read side: cheaper per forward)."""
        return self

    def __enter__(self) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth or self._writer == threading.get_ident():  # already reading or writing: only count the depth
            local.depth = depth + 1
            return
        with self._cond:
            self._cond.wait_for(lambda: self._writer is None and not self._waiting_writers)
            self._readers += 1
        local.depth = 1

    def __exit__(self, *exc: Any) -> None:
        local = self._local
        local.depth -= 1
        if local.depth or self._writer == threading.get_ident():  # still reading, or a read inside our own write
            return
        with self._cond:
            self._readers -= 1
            if not self._readers and self._waiting_writers:  # only a writer waits for the readers to leave
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Change the state: waits until no forward runs."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._write_depth += 1
            else:
                if getattr(self._local, "depth", 0):
                    raise RuntimeError("the adapter state cannot change inside a forward of the same model (this "
                                       "thread is running one): switch adapters before or after the call")
                self._waiting_writers += 1
                try:
                    self._cond.wait_for(lambda: self._writer is None and not self._readers)
                finally:
                    self._waiting_writers -= 1
                self._writer, self._write_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._write_depth -= 1
                if not self._write_depth:
                    self.version += 1
                    self._writer = None
                    self._cond.notify_all()


def _on_tree(codes: list[GeneratedCode], graphs: list[GraphModule], check: Callable[[GeneratedCode], bool]) -> bool:
    """Whether the version ``codes`` is of the tree ``graphs`` and each passes ``check``."""
    return len(graphs) == len(codes) and all(g is c.gm and check(c) for g, c in zip(graphs, codes))


class GraphVersions:
    """Each graph tree's versions per adapter-state key (the ``LIMIT`` most recent), and the graphs derived from a
    source graph per kind."""

    LIMIT = 16

    def __init__(self) -> None:
        self._built: "weakref.WeakKeyDictionary[GraphModule, OrderedDict]" = weakref.WeakKeyDictionary()
        self._current: "weakref.WeakKeyDictionary[GraphModule, Hashable]" = weakref.WeakKeyDictionary()
        self._derived: "weakref.WeakKeyDictionary[GraphModule, dict]" = weakref.WeakKeyDictionary()

    def __reduce__(self) -> Any:  # a copy (deepcopy, pickle) starts empty
        return (GraphVersions, ())

    def derived(self, source: GraphModule, kind: str, key: Hashable, build: Callable[[], Any]) -> Any:
        """The graph of ``kind`` (e.g. "mixed", a decode shape) derived from ``source`` for ``key`` (the adapter
        structure), built again when ``key`` changed: one per kind keeps no deleted adapter alive."""
        cache = self._derived.setdefault(source, {})
        found = cache.get(kind)
        if found is None or found[0] != key:
            found = cache[kind] = (key, build())
        return found[1]

    def derived_of(self, source: GraphModule) -> dict[Hashable, Any]:
        """The graphs derived from ``source`` now, by kind."""
        return {kind: found[1] for kind, found in self._derived.get(source, {}).items()}

    def current(self, root: GraphModule) -> Optional[Hashable]:
        """The key the tree of ``root`` was last switched to (None: never)."""
        return self._current.get(root)

    def switch(self, root: GraphModule, graphs: list[GraphModule], before: Hashable, after: Hashable,
               build: Callable[[], None]) -> None:
        """Make the tree (``root``; ``graphs``, root first) the version for ``after``: put back, or ``build()`` on
        copies of the graphs. ``before``: the key the tree is built for now (None: unknown)."""
        built, current = self._built.setdefault(root, OrderedDict()), self._current.get(root)
        codes = built.get(current)
        if codes is not None and not _on_tree(codes, graphs, GeneratedCode.current):
            built.clear()  # edited outside the versions: whatever was built may be stale
        elif codes is None and current is None and before is not None:
            built[before] = [GeneratedCode(g) for g in graphs]  # the tree as it is: built for ``before``
        codes = built.get(after)
        if codes is not None and _on_tree(codes, graphs, GeneratedCode.restorable):
            for code in codes:
                code.restore()
            built.move_to_end(after)
        else:
            for g in graphs:  # build on copies: the Graph objects of stored versions are never edited
                replace_with_copy(g)
            build()
            built[after] = [GeneratedCode(g) for g in graphs]
            while len(built) > self.LIMIT:
                built.popitem(last=False)
        self._current[root] = after
