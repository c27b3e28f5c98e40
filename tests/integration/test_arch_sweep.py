"""The architecture sweep (issue 31) on a fixed subset: the six supported architectures, which must get a
sparse layer and be exact at keep_ratio 1.0, and a few others lemo leaves dense, each of which must say
why. No model may be silently wrong or crash under lemo only. The full sweep (every registered causal LM,
~25 minutes on 2 cores) is benchmarks/arch_sweep.py."""

from lemo_compile.testing import sweep

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
# post-norm (BART; BERT with its residual adds inside submodules), a multimodal class with vision towers the
# sweep sizes (Gemma 3), a third residual block after the MLP (Gemma 4's per-layer input)
# (EXAONE: the Llama class built from its own config; transformers 5.17 does not register it)
MORE = ("bart", "bert", "gemma3", "gemma4_text") + tuple(t for t in ("exaone",) if t in sweep.causal_lm_classes())
# attention written into the model, so the reference cannot make it sparse: exact at keep 1.0 only
# (GPT-Neo: a torch.where mask on fp32 scores, made SDPA by passes.eager_attention)
OWN_ATTENTION = ("gpt_neo",)
OTHERS = ("gpt2", "mamba", "arcee", "gemma2")  # no decoder layers; no attention; an MLP op; attention not SDPA


def test_sweep_subset_is_never_silently_dense_or_wrong():
    rows = sweep.sweep(SUPPORTED + MORE + OWN_ATTENTION + OTHERS, timeout=120)
    by_type = {r["model_type"]: r for r in rows}
    assert list(by_type) == list(SUPPORTED + MORE + OWN_ATTENTION + OTHERS)
    figs = sweep.figures(rows)
    assert figs["arch_sweep_silent_wrong"]["value"] == 0, [r for r in rows if sweep.silent_wrong(r)]
    assert figs["arch_sweep_inexact_keep1"]["value"] == 0, [r for r in rows if sweep.inexact(r)]
    assert figs["arch_sweep_crashes"]["value"] == 0, [r["error"] for r in rows if r["error"]]
    assert all(r["error"] is None for r in rows), [(r["model_type"], r["error"]) for r in rows if r["error"]]
    for mt in SUPPORTED + MORE + OWN_ATTENTION:
        r = by_type[mt]
        assert r["layers_found"] == 4 and r["layers_sparse"] == 1 and r["exact_at_keep1"], r
    for r in rows:
        assert r["layers_sparse"] or sweep.reason(r), r
    for mt in SUPPORTED + MORE:  # keep 0.5 against the reference, same keep sets
        assert by_type[mt]["exact_at_keep05"] is True, by_type[mt]
    for mt in OWN_ATTENTION:
        assert "reference cannot run it" in by_type[mt]["keep05_note"], by_type[mt]
    assert "| llama | LlamaForCausalLM | 4 | 1 | yes | yes | yes |  |" in sweep.markdown_table(rows)


def test_figures_count_silent_wrong_and_lemo_crashes_only():
    """Silently wrong: inexact at keep 1.0 with no reason on record, or different from the reference at
    keep 0.5 (a sparse rewrite that keep 1.0 cannot tell from dense)."""
    base = dict(layers_found=4, layers_sparse=0, loss_segmented=False, reasons=[], keep1_reasons=[],
                exact_at_keep1=True, error=None, error_kind=None, eager_deterministic=True)
    rows = [
        {**base, "model_type": "a", "class": "A", "layers_sparse": 1},
        {**base, "model_type": "b", "class": "B", "exact_at_keep1": False},  # silently wrong
        {**base, "model_type": "c", "class": "C", "exact_at_keep1": False, "keep1_reasons": ["[x] y: z"]},
        {**base, "model_type": "d", "class": "D", "exact_at_keep1": False, "eager_deterministic": False},
        {**base, "model_type": "e", "class": "E", "error": "lemo crash: E: x", "error_kind": "lemo_crash"},
        {**base, "model_type": "f", "class": "F", "error": "unsupported by this sweep: x", "error_kind": "unsupported"},
        {**base, "model_type": "g", "class": "G", "layers_sparse": 1, "exact_at_keep05": False},  # wrong when sparse
        {**base, "model_type": "h", "class": "H", "layers_sparse": 1, "exact_at_keep05": True},
    ]
    values = {k: v["value"] for k, v in sweep.figures(rows).items()}
    assert values == {"arch_sweep_total": 8, "arch_sweep_sparse_fraction": 3 / 8, "arch_sweep_silent_wrong": 2,
                      "arch_sweep_inexact_keep1": 2, "arch_sweep_inexact_keep05": 1,
                      "arch_sweep_reference_checked": 2, "arch_sweep_crashes": 1}
    assert "| d | D | 4 | 0 | no | no (eager varies too) |" in sweep.markdown_table(rows)
