"""One adapter state, many readers: the state lock and the graph versions built for each adapter state.

``StateLock``: forwards read the adapter state, switches (``set_adapter``, ``merge``, ``load_adapter``, ...)
write it. A readers-writer lock (writers first, reentrant per thread) makes every forward run on one
consistent state: a switch waits for the running forwards and the forwards wait for the switch.

``GraphVersions``: a switch changes which adapter nodes a graph tree carries. Emitting them and regenerating
the Python code costs milliseconds per graph, and torch.fx keeps every generated source it ever executed (a
leak per switch). So each tree keeps the versions it was built in, per adapter-state key: switching to a key
seen before puts the built ``Graph`` and its generated ``forward`` back (no emission, no code generation);
a new key is built once, on a copy, so the versions already built stay intact. A tree edited outside (e.g.
gradient checkpointing rewrites block calls) is noticed by its generated code and its versions dropped.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Optional

from torch.fx import Graph, GraphModule

__all__ = ["StateLock", "GraphVersions"]


class StateLock:
    """A readers-writer lock: many forwards at once, one switch at a time, writers first.

    Reentrant: a thread holding the write side may read and write again; a thread holding the read side may
    read again (a forward inside a forward), but not write (that would wait for itself): RuntimeError.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: Optional[int] = None
        self._write_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> "StateLock":
        return StateLock()

    def __reduce__(self) -> Any:
        return (StateLock, ())

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the state unchanged for the duration (a forward)."""
        me = threading.get_ident()
        if self._depth() or self._writer == me:
            self._local.depth = self._depth() + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Change the state: waits until no forward runs."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._write_depth += 1
            else:
                if self._depth():
                    raise RuntimeError("the adapter state cannot change inside a forward of the same model (this "
                                       "thread is running one): switch adapters before or after the call")
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer, self._write_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._write_depth -= 1
                if not self._write_depth:
                    self._writer = None
                    self._cond.notify_all()


# What GraphModule.recompile sets from a Graph: restored together, never one without the others.
_CODE_FIELDS = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")


class _Version:
    """One graph tree as built for one adapter-state key: per graph its class, Graph and generated code."""

    def __init__(self, graphs: list[GraphModule]) -> None:
        self.entries = [(g, type(g), g._graph, {f: getattr(g, f, None) for f in _CODE_FIELDS},
                         type(g).__dict__.get("forward")) for g in graphs]

    def matches(self, graphs: list[GraphModule]) -> bool:
        """The tree is as this version left it (same graphs, classes and generated code)."""
        return len(graphs) == len(self.entries) and all(
            g is e[0] and type(g) is e[1] and g._graph is e[2] and getattr(g, "_code", None) is e[3]["_code"]
            for g, e in zip(graphs, self.entries))

    def fits(self, graphs: list[GraphModule]) -> bool:
        """The version can be put back on this tree (same graphs and classes)."""
        return len(graphs) == len(self.entries) and all(
            g is e[0] and type(g) is e[1] and e[4] is not None for g, e in zip(graphs, self.entries))

    def restore(self) -> None:
        for g, cls, graph, fields, forward in self.entries:
            g._graph = graph
            graph.owning_module = g
            for name, value in fields.items():
                setattr(g, name, value)
            cls.forward = forward


def copy_graph(graph: Graph) -> Graph:
    """A copy of ``graph`` whose vera_fx node tags are copies too (passes edit tags in place)."""
    new = Graph(tracer_cls=graph._tracer_cls)
    copied = new.graph_copy(graph, val_map={}, return_output_node=True)
    new._codegen = graph._codegen  # shared: never edited (a deep copy of its pytree specs warns)
    if copied is not None:
        value, old_output = copied
        new.output(value, type_expr=getattr(old_output, "type", None)).meta = copy.copy(old_output.meta)
    for node in new.nodes:
        for key, value in node.meta.items():
            if key.startswith("vera_fx") and isinstance(value, dict):
                node.meta[key] = dict(value)
    if hasattr(graph, "_co_fields"):
        new._co_fields = graph._co_fields
    return new


class GraphVersions:
    """The versions of each graph tree per adapter-state key (the ``limit`` most recent per tree)."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._trees: "weakref.WeakKeyDictionary[GraphModule, dict]" = weakref.WeakKeyDictionary()

    def __deepcopy__(self, memo: dict) -> "GraphVersions":
        return GraphVersions(self.limit)

    def __reduce__(self) -> Any:
        return (GraphVersions, (self.limit,))

    def clear(self, root: Optional[GraphModule] = None) -> None:
        """Forget the versions of ``root``'s tree (of every tree when None)."""
        if root is None:
            self._trees.clear()
        else:
            self._trees.pop(root, None)

    def switch(self, root: GraphModule, graphs: list[GraphModule], before: Hashable, after: Hashable,
               build: Callable[[], None]) -> bool:
        """Make the tree (``root`` and its ``graphs``, root first) the version for ``after``: put back if it was
        built before, else ``build()`` it on copies of the graphs. ``before`` is the key the tree is built for
        now. Returns True when a built version was put back."""
        entry = self._trees.setdefault(root, {"current": None, "built": OrderedDict()})
        built: OrderedDict = entry["built"]
        current = built.get(entry["current"])
        if current is not None and not current.matches(graphs):
            built.clear()  # edited outside the versions: whatever was built may be stale
        elif current is None and entry["current"] is None and before is not None:
            built[before] = _Version(graphs)  # the tree as it is: built for ``before``
        version = built.get(after)
        if version is not None and version.fits(graphs):
            version.restore()
            built.move_to_end(after)
            entry["current"] = after
            return True
        for g in graphs:  # build on copies: the Graph objects of stored versions are never edited
            new = copy_graph(g._graph)
            g._graph = new
            new.owning_module = g
        build()
        built[after] = _Version(graphs)
        while len(built) > self.limit:
            built.popitem(last=False)
        entry["current"] = after
        return False
