"""Calibration: oracle capture, rules and metrics, the low-rank predictor, predictor files, and a
calibrated predictor in the compiled graph against the reference."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig, calibrate
from lemo_compile.predictors import block_mean, pooled_qk_scores
from lemo_compile.reference import reference_forward
from lemo_compile.testing.models import random_batch, tiny_model, trainable_grads

BLOCK = 16


def _chunks(count, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, n), generator=g) for _ in range(count)]


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", lora=True)
    m.eval()
    return m


@pytest.fixture(scope="module")
def caps(model):
    return calibrate.capture(model, _chunks(3, 100), BLOCK, progress=False)


def test_capture_shapes_and_mass(model, caps):
    layers = calibrate.decoder_layers(model)
    assert len(caps) == len(layers)
    nb = -(-100 // BLOCK)
    for cap in caps:
        assert cap.block_means.shape == (3, nb, model.config.hidden_size)
        assert cap.max_scores.shape == cap.mass.shape == (3, nb, nb)
        rows = torch.tensor([BLOCK] * (nb - 1) + [100 - BLOCK * (nb - 1)], dtype=torch.float32)
        torch.testing.assert_close(cap.mass.sum(-1), rows.expand(3, nb), rtol=1e-5, atol=1e-4)
        assert torch.all(cap.max_scores.triu(1) == 0) and cap.max_scores.max() > 0


def test_block_means_are_the_predictor_inputs(model, caps):
    # the capture's block means are those of the normalized hidden states the attention reads
    ids = _chunks(3, 100)[0]
    seen = {}
    layer = calibrate.decoder_layers(model)[1]
    def grab(mod, args, kwargs):
        seen.setdefault("x", kwargs["hidden_states"].detach())

    h = layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    torch.testing.assert_close(caps[1].block_means[0], block_mean(seen["x"], None, BLOCK)[0])


@pytest.mark.parametrize("rule", calibrate.RULES)
def test_rules_and_metrics(caps, rule):
    cap = caps[2]
    s = calibrate.oracle_scores(cap, rule)
    assert s.shape == cap.block_means.shape[:2]
    own = calibrate.evaluate(s, cap, 0.5, rule)
    assert own["recall"] == 1.0 and 0 < own["mass_kept"] <= 1.0 + 1e-6
    if rule == "mass":  # the reference set of mass_vs_oracle
        assert own["mass_vs_oracle"] == 1.0
    flipped = calibrate.evaluate(-s, cap, 0.5, rule)  # keeps the rule's worst blocks
    assert flipped["recall"] < 1.0 and flipped["mass_vs_oracle"] < own["mass_vs_oracle"]
    everything = calibrate.evaluate(s, cap, 1.0, rule)
    assert everything["recall"] == 1.0 and abs(everything["mass_kept"] - 1.0) < 1e-5
    assert abs(everything["mass_vs_oracle"] - 1.0) < 1e-6


def test_lowrank_at_full_rank_is_the_pooled_predictor(model, caps):
    layers = calibrate.decoder_layers(model)
    att = layers[1].self_attn
    full = calibrate.LowRankPredictor.from_model(model, att.head_dim)
    x = torch.randn(2, 100, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    ref = pooled_qk_scores(x, None, att.q_proj.base_layer.weight, None, att.k_proj.base_layer.weight, None,
                           full.heads, att.k_proj.base_layer.weight.shape[0] // att.head_dim, BLOCK)
    got = full.scores(1, block_mean(x, None, BLOCK))
    # relu(q.k) per head is invariant under the factorization; scores match to fp32 rounding
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    low = calibrate.LowRankPredictor.from_model(model, 2)
    assert low.params_per_layer() == 2 * full.heads * 2 * model.config.hidden_size
    with pytest.raises(ValueError, match="exceeds the head dimension"):
        calibrate.LowRankPredictor.from_model(model, att.head_dim + 1)


@pytest.mark.parametrize("objective", calibrate.OBJECTIVES)
def test_training_lowers_its_loss(model, caps, objective):
    pred = calibrate.LowRankPredictor.from_model(model, 2)
    first = calibrate.train(pred, caps, 0.5, "mass", steps=1, progress=False, objective=objective)
    last = calibrate.train(pred, caps, 0.5, "mass", steps=40, progress=False, objective=objective)
    assert sum(last) < sum(first)


def test_kl_objective_is_the_divergence_from_the_received_mass(caps):
    """Fitting only the scale and offset, "kl" scores that are the log of each key block's received mass
    reach a far lower loss than scores that ignore it (the loss measures that distribution)."""
    cap = caps[1]
    received = cap.mass.sum(-2)

    class Fixed(calibrate.LowRankPredictor):
        def __init__(self, s):
            torch.nn.Module.__init__(self)
            self.register_buffer("s", s)  # not trained: only train()'s scale and offset are

        def scores(self, layer, block_means):
            return self.s

    def fitted(s):
        return calibrate.train(Fixed(s), [cap], 0.5, "mass", steps=300, lr=3e-2, progress=False)[0]

    exact = fitted((received / received.sum(-1, keepdim=True)).log())
    unrelated = fitted(torch.randn(received.shape, generator=torch.Generator().manual_seed(0)))
    assert exact < 0.25 * unrelated, (exact, unrelated)
    with pytest.raises(ValueError, match="unknown calibration objective"):
        calibrate.train(Fixed(received), [cap], 0.5, "mass", steps=1, progress=False, objective="recall")


def test_file_round_trip_and_model_check(tmp_path, model):
    pred = calibrate.LowRankPredictor.from_model(model, 2)
    path = str(tmp_path / "pred.safetensors")
    calibrate.save(path, pred, model, BLOCK, {"rule": "mass"})
    meta, factors = calibrate.load(path)
    assert meta["rule"] == "mass" and meta["block_size"] == BLOCK and meta["rank"] == 2
    torch.testing.assert_close(factors[1][0], pred.q[1].detach())
    back = calibrate.LowRankPredictor.from_file(path)
    assert (back.heads, back.rank, len(back.q)) == (pred.heads, pred.rank, len(pred.q))
    x = torch.randn(1, 5, model.config.hidden_size)
    torch.testing.assert_close(back.scores(1, x), pred.scores(1, x).detach())
    calibrate.check_model(path, model)
    other = tiny_model("llama", lora=True, seed=1)  # same sizes, other weights
    with pytest.raises(ValueError, match="another model.*weights_sha256"):
        calibrate.check_model(path, other)
    assert LemoConfig(predictor=path).predictor == path
    bogus = tmp_path / "not.safetensors"
    bogus.write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="cannot read"):
        LemoConfig(predictor=str(bogus))
    with pytest.raises(ValueError, match="no such file"):
        LemoConfig(predictor=str(tmp_path / "missing.safetensors"))


def test_bad_calibration_input(model):
    with pytest.raises(ValueError, match="empty dataset"):
        calibrate.capture(model, [], BLOCK, progress=False)
    with pytest.raises(ValueError, match="shorter than one block"):
        calibrate.capture(model, _chunks(1, 10), BLOCK, progress=False)
    with pytest.raises(ValueError, match="one length"):
        calibrate.capture(model, _chunks(1, 40) + _chunks(1, 50), BLOCK, progress=False)


def test_calibrated_predictor_in_the_graph_matches_the_reference(tmp_path):
    model = tiny_model("llama", lora=True)
    pred = calibrate.LowRankPredictor.from_model(model, 2)
    with torch.no_grad():  # something training could have produced: not the SVD factors
        for p in pred.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = str(tmp_path / "pred.safetensors")
    calibrate.save(path, pred, model, 64)
    batch = random_batch(256, 2, 200, seed=8)
    # attn_mode "tokens": its forward depends on the selection, which the last check below relies on
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,), predictor=path, attn_mode="tokens")

    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, backend=lemo_compile.backend(cfg))(**batch)
    out.loss.backward()
    grads = trainable_grads(model)
    rec = [r for r in lemo_compile.records() if r.detect and r.detect.layers][-1]
    assert rec.sparsify.counters["sparse_layers"] == 3

    def scorer(i, x, valid):
        return pooled_qk_scores(x.float(), valid, pred.q[i].detach(), None, pred.k[i].detach(), None,
                                pred.heads, pred.heads, 64)

    from lemo_compile.reference import scorer_for

    x = torch.randn(2, 200, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    valid = torch.ones(2, 200, dtype=torch.bool)
    for i in (1, 3):  # the helper other tools use gives the same scores
        torch.testing.assert_close(scorer_for(model, cfg)(i, x, valid), scorer(i, x, valid))
    model.zero_grad(set_to_none=True)
    res = reference_forward(model, cfg, scorer=scorer, **batch)
    res.output.loss.backward()
    torch.testing.assert_close(out.loss.detach(), res.output.loss.detach(), rtol=1e-5, atol=0)
    ref = trainable_grads(model)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-4, atol=1e-4 * ref[k].abs().max().item(), msg=k)
    # and the selection differs from the pooled predictor's (the file is really used)
    pooled_cfg = cfg.replace(predictor="pooled")
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    out2 = torch.compile(model, backend=lemo_compile.backend(pooled_cfg))(**batch)
    assert not torch.equal(out2.loss.detach(), out.loss.detach())


def test_predictor_file_for_another_model_is_an_error(tmp_path):
    small = tiny_model("llama", lora=True)
    path = str(tmp_path / "pred.safetensors")
    calibrate.save(path, calibrate.LowRankPredictor.from_model(small, 2), small, 64)
    other = tiny_model("llama", lora=True, layers=5)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="another model: 4 layers in the file, 5 in the model"):
        torch.compile(other, backend=lemo_compile.backend(
            LemoConfig(inner="eager", keep_ratio=0.5, predictor=path)))(**random_batch(256, 1, 128, seed=1))


def test_run_is_resumable_and_reports(tmp_path, model, monkeypatch):
    out = str(tmp_path / "pred.safetensors")
    chunks, held = _chunks(2, 80, seed=1), _chunks(1, 80, seed=2)
    rep = calibrate.run(model, chunks, out, block=BLOCK, keep=0.5, steps=5, held_out=held, progress=False)
    assert rep["rank"] == calibrate.default_rank(model) and len(rep["held_out"]) == 4
    assert calibrate.read_metadata(out)["rule"] == "mass" and calibrate.read_metadata(out)["objective"] == "kl"
    assert all(row["trained"]["mass_vs_oracle"] > 0 for row in rep["held_out"])
    calls = []
    real = calibrate.capture
    monkeypatch.setattr(calibrate, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    calibrate.run(model, chunks, out, block=BLOCK, keep=0.5, steps=5, progress=False)
    assert calls == []  # the kept capture was reused
    calibrate.run(model, _chunks(2, 80, seed=3), out, block=BLOCK, keep=0.5, steps=5, progress=False)
    assert calls == [1]  # other text: captured again
    with pytest.raises(ValueError, match="unknown oracle rule"):
        calibrate.run(model, chunks, out, rule="best", progress=False)
    with pytest.raises(ValueError, match="unknown calibration objective"):
        calibrate.run(model, chunks, out, objective="recall", progress=False)


def test_pooled_attention_scores_equal_pooled_qk_scores_of_a_linear_projection():
    """Block means commute with a linear projection: pooling the projected q and k (what MLA layers use)
    gives the scores of projecting the pooled x, on padded rows, GQA heads and a partial last block."""
    from lemo_compile.predictors import pooled_attention_scores

    g = torch.Generator().manual_seed(7)
    b, n, d, heads, kv, hd, block = 2, 150, 24, 4, 2, 8, 64
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    wq, wk = torch.randn(heads * hd, d, generator=g, dtype=torch.float64), torch.randn(kv * hd, d, generator=g,
                                                                                      dtype=torch.float64)
    bq, bk = torch.randn(heads * hd, generator=g, dtype=torch.float64), torch.randn(kv * hd, generator=g,
                                                                                   dtype=torch.float64)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :37] = False
    q = torch.nn.functional.linear(x, wq, bq).unflatten(-1, (heads, hd)).transpose(1, 2)
    k = torch.nn.functional.linear(x, wk, bk).unflatten(-1, (kv, hd)).transpose(1, 2)
    want = pooled_qk_scores(x, valid, wq, bq, wk, bk, heads, kv, block)
    got = pooled_attention_scores(q, k, valid, block)
    assert got.shape == (b, 3)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
