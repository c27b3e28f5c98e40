"""Shared pieces of every pass: skip reasons, the result record, small FX predicates."""

from __future__ import annotations

import collections
import dataclasses
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx


@dataclasses.dataclass(frozen=True)
class SkipReason:
    """Why a pass left something alone. `kind` is a short stable tag tests can count."""

    kind: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.where}: {self.detail}"


class CantRewrite(Exception):
    """Raised by deep helpers; caught at the pass boundary and turned into a SkipReason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclasses.dataclass
class PassResult:
    name: str
    counters: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skips: list[SkipReason] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def skip(self, kind: str, where: str, detail: str) -> None:
        self.skips.append(SkipReason(kind, where, detail))
        self.counters[f"skip_{kind}"] += 1


ADD_TARGETS = (operator.add, operator.iadd, torch.add, torch.Tensor.add, "add", "add_")


def is_call(node: Any, *targets: Any) -> bool:
    """True for call_function/call_method nodes whose target is one of `targets` (functions or method names)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    return any(node.target is t or node.target == t for t in targets)


def is_add(node: Any) -> bool:
    return is_call(node, *ADD_TARGETS)


def value_of(node: Any) -> Any:
    """The fake value of a node (Dynamo: example_value; AOT: val)."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def shape_of(node: Any) -> tuple | None:
    v = value_of(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def closure_back(start: fx.Node, allowed: set[fx.Node], stop: Iterable[fx.Node] = ()) -> set[fx.Node]:
    """All nodes in `allowed` reachable backwards from `start` (inclusive) without passing `stop`."""
    stop = set(stop)
    seen: set[fx.Node] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n in seen or n in stop or n not in allowed:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def same_size(a: Any, b: Any) -> bool:
    """Equality of two sizes (ints or SymInts) without adding guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - defensive across versions
        return str(a) == str(b)
