"""Dead-code elimination that keeps live in-place ops (passes.common.eliminate_dead_code): FX's own
drops an in-place op whose return value is unused, e.g. an MoE router's mask.scatter_(...), and a pass
that cleaned up with it changed the model's numbers (found by the architecture sweep on glm4_moe,
llama4, gpt_oss, bailing_hybrid at keep 1.0)."""

import torch
import torch.fx as fx

from passes.common import eliminate_dead_code


def _router(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(x)
    mask.scatter_(1, idx, 1.0)  # result unused; the mutation is what matters
    dead = torch.zeros_like(x)
    dead.fill_(5.0)  # mutates a tensor nothing reads afterwards
    view = torch.ones_like(x)
    view.narrow(1, 1, 4).mul_(3.0)  # through a view of a tensor read below
    return x * mask + view


def test_live_in_place_ops_survive_and_dead_ones_go():
    gm = fx.symbolic_trace(_router)
    x, idx = torch.randn(3, 5), torch.tensor([[1], [4], [0]])
    want = _router(x, idx)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    torch.testing.assert_close(gm(x, idx), want, rtol=0, atol=0)
    targets = [n.target for n in gm.graph.nodes]
    assert "scatter_" in targets and "mul_" in targets and "fill_" not in targets
    # the dead tensor and its fill_ are gone
    assert sum(1 for n in gm.graph.nodes if n.target is torch.zeros_like) == 1


def test_plain_fx_dce_would_have_dropped_the_scatter():
    gm = fx.symbolic_trace(_router)
    gm.graph.eliminate_dead_code()
    assert "scatter_" not in [n.target for n in gm.graph.nodes]  # the defect this module guards against


def test_dead_code_elimination_keeps_vmap_nesting():
    """torch.vmap inside a compiled function leaves _vmap_increment/_decrement_nesting calls with no users
    (Jamba's Mamba scan): they change functorch's state, so the passes' DCE keeps them; dropping them made
    AOT autograd fail with "your tensor may have escaped from inside a function being vmapped"."""
    gms = []

    def capture(gm, example_inputs):
        gms.append(gm)
        return gm.forward

    def f(x):
        return torch.vmap(lambda r: r.sin() * 2)(x).sum()

    torch._dynamo.reset()
    x = torch.randn(3, 5)
    torch.compile(f, backend=capture, fullgraph=True)(x)
    gm = gms[0]
    names = lambda: [getattr(n.target, "__name__", "") for n in gm.graph.nodes]  # noqa: E731
    before = names()
    assert "_vmap_decrement_nesting" in before
    eliminate_dead_code(gm.graph)
    gm.recompile()
    assert names() == before
    out = gm(x)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, f(x))
