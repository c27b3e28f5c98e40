"""LemoConfig: validation, immutability, the process default (patch/resolve), the layer schedule, and
bad options reaching the user through torch.compile."""

import dataclasses
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lemo_compile
from lemo_compile import AttnMode, LemoConfig, MlpMode
from lemo_compile import config as lemo_config


# -- validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.1, True, "0.5", None])
def test_keep_ratio_out_of_range_names_the_field(value):
    with pytest.raises(ValueError, match="keep_ratio"):
        LemoConfig(keep_ratio=value)


@given(st.floats(min_value=1e-6, max_value=1.0))
def test_keep_ratio_accepts_the_unit_interval(r):
    assert LemoConfig(keep_ratio=r).keep_ratio == r


@pytest.mark.parametrize("value", [48, 0, -64, 3, 64.0, True])
def test_block_size_must_be_a_power_of_two(value):
    with pytest.raises(ValueError, match="power of two"):
        LemoConfig(block_size=value)


@pytest.mark.parametrize("value", [1, 16, 64, 128])
def test_block_size_powers_of_two_pass(value):
    assert LemoConfig(block_size=value).block_size == value


def test_unknown_attn_mode_lists_accepted_values():
    with pytest.raises(ValueError) as e:
        LemoConfig(attn_mode="queries")
    msg = str(e.value)
    assert "attn_mode" in msg and "'queries'" in msg
    for mode in AttnMode:
        assert repr(mode.value) in msg


def test_unknown_mlp_mode_and_inner_are_rejected():
    with pytest.raises(ValueError, match="mlp_mode.*'backward'.*'tokens'.*'dense'"):
        LemoConfig(mlp_mode="sparse")
    with pytest.raises(ValueError, match="inner"):
        LemoConfig(inner="cudagraphs")


def test_modes_accept_strings_and_enums():
    a = LemoConfig(attn_mode="keys", mlp_mode="dense")
    b = LemoConfig(attn_mode=AttnMode.KEYS, mlp_mode=MlpMode.DENSE)
    assert a == b and a.attn_mode is AttnMode.KEYS and a.mlp_mode is MlpMode.DENSE
    assert a.attn_mode == "keys"  # str enums compare equal to their values


@pytest.mark.parametrize("kwargs, field", [
    (dict(dense_layers=(0, -1)), "dense_layers"),
    (dict(layer_keep_ratios=((-2, 0.5),)), "layer_keep_ratios"),
    (dict(layer_index=-1), "layer_index"),
    (dict(dense_layers=(True,)), "dense_layers"),
])
def test_negative_or_non_int_layer_indices(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LemoConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(dense_layers=5), "dense_layers"),
    (dict(dense_layers="0,1"), "dense_layers"),
    (dict(forced_blocks=0), "forced_blocks"),
    (dict(layer_keep_ratios=0.5), "layer_keep_ratios"),
    (dict(layer_keep_ratios=((1, 0.5, 2),)), "layer_keep_ratios"),
    (dict(layer_keep_ratios=(1, 0.5)), "layer_keep_ratios"),
])
def test_sequences_of_the_wrong_type_name_the_field(kwargs, field):
    """A lone number or a string where a tuple belongs: a ValueError naming the option, not a bare
    TypeError from iterating it."""
    with pytest.raises(ValueError, match=f"LemoConfig.{field} must"):
        LemoConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(dense_layers=(0, 99)), "dense_layers"),
    (dict(layer_keep_ratios=((4, 0.5),)), "layer_keep_ratios"),
])
def test_layers_the_model_does_not_have_are_an_error(kwargs, field):
    from lemo_compile.reference import reference_forward
    from lemo_compile.testing.models import random_batch, tiny_model

    model = tiny_model("llama")  # 4 layers
    batch = random_batch(256, 1, 64, seed=0)
    cfg = LemoConfig(inner="eager", **kwargs)
    with pytest.raises(Exception, match=rf"LemoConfig.{field} names layers \[(99|4)\], but the model has 4"):
        torch.compile(model, backend=lemo_compile.backend(cfg))(**batch)
    with pytest.raises(ValueError, match=f"LemoConfig.{field} names layers"):
        reference_forward(model, cfg, **batch)
    LemoConfig(**kwargs).check_layers(100)  # fine for a model that has them


@pytest.mark.parametrize("field", ["segment_bytes", "mlp_segment_bytes"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "1024"])
def test_segment_budgets_are_positive_ints(field, value):
    with pytest.raises(ValueError, match=f"LemoConfig.{field} must be a positive int"):
        LemoConfig(**{field: value})


def test_per_layer_ratio_is_validated_with_its_layer():
    with pytest.raises(ValueError, match=r"layer_keep_ratios\[3\]"):
        LemoConfig(layer_keep_ratios=((3, 1.5),))


def test_other_fields_are_validated():
    with pytest.raises(ValueError, match="enabled"):
        LemoConfig(enabled=1)
    with pytest.raises(ValueError, match="predictor"):
        LemoConfig(predictor="oracle.safetensors")
    with pytest.raises(ValueError, match="num_layers"):
        LemoConfig(num_layers=0)
    with pytest.raises(ValueError, match="forced_blocks"):
        LemoConfig(forced_blocks=(0.5,))


# -- immutability and hashing ------------------------------------------------------------------------

def test_frozen():
    cfg = LemoConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.keep_ratio = 0.5  # type: ignore[misc]


def test_hashable_and_normalized():
    a = LemoConfig(layer_keep_ratios={5: 0.25}, dense_layers=[0, 1])
    b = LemoConfig(layer_keep_ratios=((5, 0.25),), dense_layers=(0, 1))
    assert a == b and hash(a) == hash(b)
    assert isinstance(a.layer_keep_ratios, tuple) and isinstance(a.dense_layers, tuple)
    assert len({LemoConfig(), LemoConfig(), a, b, LemoConfig(keep_ratio=0.5)}) == 3
    assert LemoConfig().to_json() == LemoConfig().to_json() != LemoConfig(keep_ratio=0.5).to_json()


def test_replace_validates_and_names_unknown_keys():
    cfg = LemoConfig()
    assert cfg.replace(keep_ratio=0.5).keep_ratio == 0.5 and cfg.keep_ratio == 0.4
    with pytest.raises(ValueError) as e:
        cfg.replace(keep_ration=0.5)
    msg = str(e.value)
    assert "'keep_ration'" in msg and "accepted options" in msg
    for name in ("keep_ratio", "block_size", "attn_mode", "mlp_mode", "inner"):
        assert name in msg
    with pytest.raises(ValueError, match="keep_ratio"):
        cfg.replace(keep_ratio=0)


# -- process default: patch / set_default / resolve --------------------------------------------------

def test_patch_restores_the_default():
    before = lemo_config.get_default()
    with lemo_config.patch(keep_ratio=0.5, attn_mode="keys") as cfg:
        assert lemo_config.get_default() is cfg
        assert cfg.keep_ratio == 0.5 and cfg.attn_mode is AttnMode.KEYS
    assert lemo_config.get_default() is before


def test_patch_restores_after_an_exception():
    before = lemo_config.get_default()
    with pytest.raises(RuntimeError):
        with lemo_config.patch(block_size=32):
            raise RuntimeError("boom")
    assert lemo_config.get_default() is before


def test_patch_rejects_unknown_keys_and_leaves_the_default():
    before = lemo_config.get_default()
    with pytest.raises(ValueError, match="bogus"):
        with lemo_config.patch(bogus=1):
            pass
    assert lemo_config.get_default() is before


def test_set_default_type_checked_and_restorable():
    before = lemo_config.get_default()
    with pytest.raises(TypeError):
        lemo_config.set_default({"keep_ratio": 0.5})
    try:
        lemo_config.set_default(LemoConfig(keep_ratio=0.3))
        assert lemo_config.resolve(None).keep_ratio == 0.3
    finally:
        lemo_config.set_default(before)


def test_resolve():
    default = lemo_config.get_default()
    assert lemo_config.resolve(None) is default and lemo_config.resolve({}) is default
    assert lemo_config.resolve({"keep_ratio": 0.7}) == default.replace(keep_ratio=0.7)
    base = LemoConfig(attn_mode="keys")
    assert lemo_config.resolve({"config": base}) is base
    assert lemo_config.resolve({"config": base, "keep_ratio": 0.7}) == LemoConfig(attn_mode="keys", keep_ratio=0.7)
    with lemo_config.patch(block_size=32):
        assert lemo_config.resolve({"keep_ratio": 0.7}).block_size == 32
    with pytest.raises(ValueError, match="LemoConfig"):
        lemo_config.resolve({"config": {"keep_ratio": 0.5}})
    with pytest.raises(ValueError, match="'bogus'"):
        lemo_config.resolve({"bogus": 1})
    with pytest.raises(ValueError, match="keep_ratio"):
        lemo_config.resolve({"keep_ratio": 2.0})


# -- layer schedule ----------------------------------------------------------------------------------

def test_default_schedule_first_half_and_last_layer_dense():
    cfg = LemoConfig()
    sparse = {i: cfg.keep_fraction(i, 8) for i in range(8) if cfg.keep_fraction(i, 8) is not None}
    assert sparse == {4: Fraction(2, 5), 5: Fraction(2, 5), 6: Fraction(2, 5)}
    assert cfg.dense_layer_set(8) == {0, 1, 2, 3, 7}
    assert cfg.dense_layer_set(5) == {0, 1, 4}  # odd: floor(5/2) dense at the start


def test_layer_keep_ratios_override():
    cfg = LemoConfig(layer_keep_ratios=((5, 0.25), (1, 0.5)))
    assert cfg.keep_fraction(5, 8) == Fraction(1, 4)
    assert cfg.keep_fraction(4, 8) == Fraction(2, 5)
    assert cfg.keep_fraction(1, 8) == Fraction(1, 2)  # an override makes a default-dense layer sparse
    assert cfg.keep_fraction(0, 8) is None


def test_explicit_dense_layers():
    cfg = LemoConfig(dense_layers=(0, 2), keep_ratio=0.5)
    assert [cfg.keep_fraction(i, 4) for i in range(4)] == [None, Fraction(1, 2), None, Fraction(1, 2)]
    assert all(LemoConfig(dense_layers=tuple(range(8))).keep_fraction(i, 8) is None for i in range(8))


def test_keep_fraction_for_single_layer_graphs():
    assert LemoConfig().keep_fraction(None, None) is None  # unknown layer: dense
    cfg = LemoConfig(layer_index=6, num_layers=8)
    assert cfg.keep_fraction(None, None) == Fraction(2, 5)
    assert LemoConfig(layer_index=2, num_layers=8).keep_fraction(None, None) is None


# -- options through torch.compile -------------------------------------------------------------------

def _compile_and_call(options):
    net = torch.nn.Linear(4, 4)
    compiled = torch.compile(net, backend="lemo", options=options)
    return compiled(torch.randn(2, 4))


def test_unknown_compile_option_fails_at_first_call_naming_it():
    with pytest.raises(Exception) as e:
        _compile_and_call({"bogus": 1})
    msg = str(e.value)
    assert "bogus" in msg and "accepted" in msg, msg


def test_bad_compile_option_value_names_the_field():
    with pytest.raises(Exception) as e:
        _compile_and_call({"keep_ratio": 2.0})
    assert "keep_ratio" in str(e.value)


def test_good_compile_options_are_used():
    out = _compile_and_call({"keep_ratio": 0.5, "inner": "eager"})
    assert out.shape == (2, 4)
    assert lemo_compile.records()[-1].config == lemo_config.get_default().replace(keep_ratio=0.5, inner="eager")


def test_backend_factory_validates_eagerly():
    with pytest.raises(ValueError, match="'bogus'"):
        lemo_compile.backend(LemoConfig(), bogus=1)
    with pytest.raises(ValueError, match="keep_ratio"):
        lemo_compile.backend(keep_ratio=0)


def test_presets_are_valid_configs_and_differ_in_recompute():
    from lemo_compile import presets

    mem, fast = presets.get("memory"), presets.get("speed")
    assert mem.activation_memory_budget == 0.5 and fast.activation_memory_budget is None
    assert mem.logits == fast.logits == "drop"
    assert presets.get("speed", keep_ratio=0.3).keep_ratio == 0.3
    faithful = presets.get("fidelity")
    assert (faithful.attn_mode.value, faithful.mlp_mode.value) == ("backward", "backward")  # exact forward
    with pytest.raises(ValueError, match="unknown lemo preset 'fast'; presets: memory, speed, fidelity"):
        presets.get("fast")


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "half"])
def test_activation_memory_budget_validated(bad):
    with pytest.raises(ValueError, match="activation_memory_budget"):
        LemoConfig(activation_memory_budget=bad)


def test_activation_memory_budget_applies_to_the_partitioner(monkeypatch):
    """The budget is in effect while the inner compiler (which partitions) runs, and only then."""
    import importlib

    import torch._functorch.config as functorch_config

    backend_mod = importlib.import_module("lemo_compile.backend")
    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches):
        seen.append(functorch_config.activation_memory_budget)
        return gm.forward

    monkeypatch.setattr(backend_mod._compat, "compile_fx", fake_compile_fx)
    before = functorch_config.activation_memory_budget
    fn = torch.compile(lambda x: torch.sin(x) * 2, backend=lemo_compile.backend(LemoConfig(activation_memory_budget=0.3)))
    fn(torch.randn(4))
    assert seen == [0.3] and functorch_config.activation_memory_budget == before


def test_fused_kernels_default_to_the_eager_inner_compiler_only():
    """Under Inductor the fused row kernels measured 1.001x the step (Inductor fuses those ends itself),
    with inner="eager" 0.977x: the default (None) turns them on only there; a bool forces either way."""
    assert LemoConfig().fused_kernels is None and not LemoConfig().use_fused_kernels
    assert LemoConfig(inner="eager").use_fused_kernels
    assert LemoConfig(fused_kernels=True).use_fused_kernels
    assert not LemoConfig(inner="eager", fused_kernels=False).use_fused_kernels
    with pytest.raises(ValueError, match="fused_kernels must be a bool"):
        LemoConfig(fused_kernels="yes")
