"""benchmarks/fidelity.py's own arithmetic: the retrieval task's sequences and the gain-retained summary
(the model runs are the benchmark's; these parts decide what its figures mean)."""

import random

import pytest
import torch

from benchmarks import fidelity


def _encode(text: str) -> list[int]:
    return list(text.encode())


def test_retrieval_sequence_has_every_fact_and_labels_only_the_answer():
    filler = _encode("And God said, Let there be light: and there was light. " * 200)
    ex = fidelity.retrieval_example(_encode, filler, 900, 5, random.Random(3))
    ids, labels = ex["input_ids"][0], ex["labels"][0]
    assert ids.shape == labels.shape == (900,)
    a, b = ex["answer"]
    assert b == 900 and (labels[:a] == -100).all() and torch.equal(labels[a:], ids[a:])
    text = bytes(ids.tolist()).decode()
    asked = text.rsplit("secret code of ", 1)[1].split("?")[0]
    code = text[a:b].strip(" .")
    assert len(code) == 5 and f"The secret code of {asked} is {code}." in text[:a]
    assert text.count("The secret code of") == 5


def test_summary_gap_and_gain_retained():
    """Gap in % of dense's held-out loss; gain kept = (before - variant) / (before - dense): dense improves
    4.0 -> 3.0, the variant to 3.2, so it keeps 0.8 of the gain at a 6.67% loss gap."""
    runs = {s: {"before": {"a": 4.0, "b": 2.0},
                "dense": {"held_out_dense_eval": {"a": 3.0, "b": 1.5}, "median_step_s": 1.0,
                          "forward_gap_pct_untrained": None},
                "v": {"held_out_dense_eval": {"a": 3.2, "b": 1.5 + 0.01 * s}, "median_step_s": 2.0,
                      "forward_gap_pct_untrained": 0.1}} for s in (0, 1)}
    out = fidelity.summarize(runs, ["dense", "v"], ["a", "b"])["v"]
    assert out["corpora"]["a"]["gap_pct_mean"] == pytest.approx(100 * 0.2 / 3.0)
    assert out["corpora"]["a"]["gain_retained_mean"] == pytest.approx(0.8)
    assert out["worst_gap_corpus"] == "a" and out["worst_gain_corpus"] == "a"
    assert out["corpora"]["b"]["gap_pct_std"] == pytest.approx(100 * 0.01 / 1.5 / 2 ** 0.5)
