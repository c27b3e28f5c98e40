"""passes.causal's verdict on a tiny Llama (LoRA, checkpointing, bf16) at each length, on one device:
whether the mask's rows could be evaluated band by band, what was made causal or why not, and the
root graph up to the first layer (the mask's subgraph) for short lengths.

    python benchmarks/diag/causal_verdict.py cuda 300 32768 131072

It found why the 128K mask of the 8B run stayed on the H200: Dynamo recorded `a == b` as the method
`__eq__` on CUDA (operator.eq on the CPU), which the row-local whitelist lacked."""
import sys, time, torch, transformers
import lemo_compile.passes.causal as C
from lemo_compile.testing.models import tiny_model
dev = sys.argv[1]
_orig = C._row_bands
def _bands(*a):
    out = _orig(*a)
    print("row bands:", "yes" if out is not None else "NONE (whole-mask path)", flush=True)
    return out
C._row_bands = _bands
for n in map(int, sys.argv[2:]):
    torch._dynamo.reset()
    model = tiny_model("llama", lora=True).to(dev).to(torch.bfloat16).train()
    model.config.max_position_embeddings = n
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    class Got(Exception): pass
    def grab(gm, ex):
        if n < 1000:  # the root graph up to the first layer: the mask's subgraph, with fake shapes
            for x in [x for x in gm.graph.nodes if x.op not in ("placeholder", "get_attr")][:45]:
                if "checkpoint" in str(x.target):
                    break
                print("   ", C.shape_of(x), x.format_node()[:140])
        t = time.time()
        res = C.make_causal(gm)
        print(transformers.__version__, dev, n, dict(res.counters), [str(s) for s in res.skips][:2], f"{time.time() - t:.1f} s", flush=True)
        if res.counters or res.skips:
            raise Got()
        return gm.forward
    ids = torch.randint(0, 256, (1, n), device=dev)
    try:
        torch.compile(model, backend=grab)(input_ids=ids, labels=ids)
    except Exception as e:
        if "Got" not in str(e) and "Got" not in type(e).__name__:
            raise
