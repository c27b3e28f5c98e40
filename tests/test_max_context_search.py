"""The longest-context search of benchmarks/max_context.py: how one variant's probes decide the next length
and when the search ends (no GPU: probe outcomes written by hand)."""

from __future__ import annotations

from benchmarks.max_context import search_state

ARGS = dict(start=196608, resolution=16384, growth=1.5, max_len=4194304, full_timeout=300)


def _probe(seq, **outcome):
    return {"variant": "v", "mode": "probe", "seq": seq, **outcome}


def test_an_error_that_is_no_out_of_memory_ends_the_search():
    """A compile error at the first length says the variant does not run, not that it is too long: the
    search stops there instead of halving the length down to nothing, and finds no longest context."""
    st = search_state([_probe(196608, error="InductorError: TypeError: missing to_dealloc")], **ARGS)
    assert st["done"] and st["bounded_by"] == "error" and st["max_tokens"] == 0
    assert "to_dealloc" in st["setup_error"]


def test_out_of_memory_bisects_between_success_and_failure():
    st = search_state([_probe(196608, oom=True, error="OutOfMemoryError"), _probe(98304, ok=True)], **ARGS)
    assert not st["done"] and st["max_tokens"] == 98304 and st["next"] == 147456
    st = search_state([_probe(196608, oom=True, error="OutOfMemoryError")], **ARGS)
    assert not st["done"] and st["next"] == 98304  # halved: no success yet
    st = search_state([_probe(98304, ok=True), _probe(106496, error="RuntimeError: index overflow")], **ARGS)
    assert st["done"] and st["bounded_by"] == "error" and st["max_tokens"] == 98304
