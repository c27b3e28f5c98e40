"""passes.seq_axis: ops without a rule are followed only when probing shows that each position's output
depends on that position alone and that exactly one output axis carries the positions."""

import pytest
import torch
import torch.nn.functional as F

from passes.common import CantRewrite
from passes.seq_axis import propagate


def _graph(fn, *inputs):
    gms = []

    def backend(gm, example_inputs):
        gms.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return gms[0]


def _axes(fn, x, axis=1):
    """Sequence axis of every tracked node of fn(x), x carrying the sequence on `axis`."""
    gm = _graph(fn, x)
    axes = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.meta["example_value"].shape == x.shape:  # x, not a captured weight
                axes[node] = axis
        elif node.op != "output":
            ax, _, _ = propagate(node, axes, None)
            if ax is not None:
                axes[node] = ax
    return gm, axes


def _output_axis(fn, x, axis=1):
    gm, axes = _axes(fn, x, axis)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    return axes.get(out)


X = torch.randn(2, 10, 12)
W = torch.randn(12)


@pytest.mark.parametrize("fn, axis", [
    (lambda x: F.layer_norm(x, (12,), W, W), 1),
    (lambda x: torch.softmax(x, dim=-1), 1),
    (lambda x: x.square() + (x > 0).float(), 1),
    (lambda x: torch.floor(x * 3), 1),
    (lambda x: x.repeat_interleave(2, dim=-1), 1),
    (lambda x: torch.topk(x, 3, dim=-1).values, 1),
    (lambda x: torch.view_as_complex(x.reshape(2, 10, 6, 2)).abs(), 1),
    (lambda x: F.layer_norm(x.transpose(0, 1), (12,)), 0),
])
def test_position_wise_ops_are_followed(fn, axis):
    assert _output_axis(fn, X) == axis


@pytest.mark.parametrize("fn, why", [
    (lambda x: torch.softmax(x, dim=1), "mixes positions"),
    (lambda x: torch.cumsum(x, dim=1), "mixes positions"),
    (lambda x: torch.flip(x, dims=[1]), "mixes positions"),
    (lambda x: torch.topk(x, 3, dim=1).values, "do not follow the positions"),
    (lambda x: x.repeat_interleave(2, dim=1), "do not follow the positions"),
    (lambda x: torch.roll(x, 1, dims=1), "mixes positions"),
    (lambda x: x + torch.arange(10.0)[None, :, None].expand(2, 10, 12).contiguous(), "full length"),
])
def test_ops_that_mix_positions_are_refused(fn, why):
    with pytest.raises(CantRewrite) as e:
        _output_axis(fn, X)
    assert e.value.kind == "sequence_axis" and why in e.value.detail, e.value.detail


def test_probe_does_not_touch_the_inputs_of_in_place_ops():
    assert _output_axis(lambda x: x.clone().mul_(2).exp_(), X) == 1


def test_collectives_are_refused_without_being_run():
    """A collective in a block (sequence parallelism's all-to-all) is refused by name: probing it would run
    a communication on one rank's compile (a hang when ranks do not probe alike)."""
    import torch.fx as fx
    from torch.distributed._functional_collectives import all_to_all_single

    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.randn(2, 8, 4)
    y = g.call_function(all_to_all_single, (x, None, None, [0]))
    y.meta["example_value"] = torch.randn(2, 8, 4)
    with pytest.raises(CantRewrite, match="collective exchanges positions"):
        propagate(y, {x: 1}, None)
