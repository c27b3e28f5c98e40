"""Padded batches and the padding test matrix (docs/design.md §2.1): shared by `tests/test_padding.py`
and `benchmarks/padding_matrix.py`, which runs every case and counts the non-finite ones.

A case compiles a tiny model of one architecture with lemo, runs one forward and backward on a padded
batch of 3 sequences, and checks that the loss and every trainable gradient are finite and equal to
the oracle's: `lemo_compile.reference` for a keep ratio below 1, the plain dense model at keep 1.0
(every block kept is the dense model, in every mode).

    batch = padded_batch("left", n=200, seed=0)
    case = run_case("llama", "left", "backward", "backward", inner="eager", keep=0.5)
    assert case.finite and case.matches
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .models import tiny_model, trainable_grads

VOCAB = 256
N = 200  # not a multiple of the 64-token block

# (left pad, right pad) per row of a batch of 3. The rows differ in their padding on purpose.
PAD_KINDS: dict[str, list[tuple[int, int]]] = {
    # one left pad token is enough for a query that sees no key
    "left": [(0, 0), (1, 0), (70, 0)],
    # 150 > the tiny Gemma3's sliding window (96): pad queries past the window see no key there
    "right": [(0, 0), (0, 37), (0, 150)],
    # a fully padded row between a left- and a right-padded one
    "empty_row": [(5, 0), (N, 0), (0, 100)],
}


KINDS = tuple(PAD_KINDS) + ("packed",)


def packed_docs(n: int = N) -> list[list[int]]:
    """Document lengths per row of a packed batch of 2 (HF DataCollatorWithFlattening / TRL padding_free:
    no attention_mask, position_ids restarting at 0 per document): a one-token document between two
    others, and a row that is one document."""
    first = min(70, n // 3)
    return [[first, 1, n - first - 1], [n]]


def packed_batch(n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, position_ids, labels (2, n) of documents packed per packed_docs(n); each document's
    first label is -100 (nothing predicts it from the previous document), as HF's flattening collator
    does."""
    g = torch.Generator().manual_seed(seed)
    layout = packed_docs(n)
    ids = torch.randint(3, VOCAB, (len(layout), n), generator=g)
    pos = torch.zeros_like(ids)
    labels = ids.clone()
    for r, docs in enumerate(layout):
        start = 0
        for length in docs:
            pos[r, start:start + length] = torch.arange(length)
            labels[r, start] = -100
            start += length
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def padded_batch(kind: str, n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels (3, n) with the padding of PAD_KINDS[kind] (pad id 0,
    mask 0, label -100); kind "packed": packed_batch."""
    if kind == "packed":
        return packed_batch(n, seed)
    if kind not in PAD_KINDS:
        raise ValueError(f"unknown padding kind {kind!r}; expected one of {sorted(KINDS)}")
    rows = PAD_KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(rows), n), generator=g)
    mask = torch.ones(len(rows), n, dtype=torch.int64)
    for i, (left, right) in enumerate(rows):
        left = min(left, n)
        mask[i, :left] = 0
        if right:
            mask[i, n - right:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@dataclasses.dataclass
class Case:
    arch: str
    kind: str
    attn_mode: str
    mlp_mode: str
    inner: str
    keep: float
    finite: bool = False  # loss and every trainable gradient finite
    loss: float = math.nan
    oracle_loss: float = math.nan
    loss_err: float = math.nan  # |loss - oracle| / |oracle|
    grad_err: float = math.nan  # worst over parameters of max |g - g_oracle| / max |g_oracle|
    worst: str = ""  # the parameter with that error
    error: str = ""  # an exception raised by the case, if any

    device: str = "cpu"
    dtype: str = "float32"

    @property
    def matches(self) -> bool:
        """fp32: the loss to 1e-5 and every gradient to 2e-4 of its own largest entry; bf16 (the oracle
        runs other kernels, each rounding to 8 bits): 2e-2 and 1e-1."""
        loss_tol, grad_tol = (1e-5, 2e-4) if self.dtype == "float32" else (2e-2, 1e-1)
        return self.finite and not self.error and self.loss_err <= loss_tol and self.grad_err <= grad_tol


def _step(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def run_case(arch: str, kind: str, attn_mode: str, mlp_mode: str, inner: str = "eager", keep: float = 0.5,
             lora: bool = True, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Case:
    """One cell of the matrix (layer 0 dense, the other 3 sparse at `keep`, random predictor)."""
    import lemo_compile
    from lemo_compile import LemoConfig
    from lemo_compile.reference import reference_forward

    case = Case(arch, kind, attn_mode, mlp_mode, inner, keep, device=device, dtype=str(dtype).split(".")[-1])
    model = tiny_model(arch, lora=lora, seed=seed).to(device=device, dtype=dtype)
    batch = {k: v.to(device) for k, v in padded_batch(kind, seed=seed).items()}
    cfg = LemoConfig(inner=inner, keep_ratio=keep, dense_layers=(0,), attn_mode=attn_mode, mlp_mode=mlp_mode,
                     predictor="random")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
        loss, grads = _step(model, lambda: compiled(**batch).loss)
        if keep < 1.0:
            want, want_grads = _step(model, lambda: reference_forward(model, cfg, **batch).output.loss)
        else:
            want, want_grads = _step(model, lambda: model(**batch).loss)
    except Exception as e:  # a case that raises is reported, not hidden
        case.error = f"{type(e).__name__}: {e}"[:300]
        return case
    finally:
        torch._dynamo.reset()
    case.finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads.values())
    case.loss, case.oracle_loss = loss.item(), want.item()
    case.loss_err = abs(case.loss - case.oracle_loss) / max(abs(case.oracle_loss), 1e-12)
    errs = [(((grads[k] - want_grads[k]).abs().max() / want_grads[k].abs().max().clamp(min=1e-12)).item(), k)
            for k in want_grads]
    case.grad_err, case.worst = max(errs) if errs else (0.0, "")
    if math.isnan(case.grad_err):
        case.grad_err = math.inf
    return case
