"""Calibration of block predictors (docs/design.md §3; issue: predictors and calibration).

Offline, model frozen, eager: run the model over real text, record per decoder layer the block means
of the normalized hidden states the predictor reads, and the layer's oracle (kernels/oracle.py, from
its post-RoPE queries and keys: block max scores and block attention mass, never n x n). Then

- `oracle_scores(cap, rule)`: one score per key block under a selection rule:
  "sum" (the paper: sum over query blocks of the block max score), "mean" (that sum over the number
  of query blocks that can see the key block), "mass" (attention probability mass the key block
  receives);
- `evaluate(scores, cap, keep)`: recall of the rule's kept blocks and the attention mass kept queries
  put on kept keys;
- `LowRankPredictor`: per layer and head, rank-r factors of the layer's own bilinear form
  W_q,h^T W_k,g(h) applied to block means (training-free from a truncated SVD; r = head_dim is the
  `pooled` predictor), optionally trained against the oracle's kept set;
- `save` / `load`: safetensors + JSON metadata with the model's fingerprint.

Calibration hooks the attention modules of the eager model for its duration (a forward pre-hook
that reads the layer's inputs); the training step itself is never touched by this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from fractions import Fraction
from typing import Iterable

import torch

from . import predictors, selection
from .kernels import oracle

FORMAT = "lemo-predictors/1"
RULES = ("sum", "mean", "mass")
# What `train` fits: "kl" distills the attention mass each key block receives (the dense attention's
# block mass, normalized per chunk) into a softmax over the predictor's scores, a target tied to what
# the kept set preserves of the model; "kept" fits the rule's top-k kept set (binary cross entropy), the
# recall objective, which ignores how much mass a block carries.
OBJECTIVES = ("kl", "kept")


@dataclasses.dataclass
class LayerCapture:
    """One decoder layer over the calibration chunks (all (chunks, ...), float32, on the CPU)."""

    layer: int
    block_means: torch.Tensor  # (c, nb, d)
    max_scores: torch.Tensor  # (c, nb, nb)
    mass: torch.Tensor  # (c, nb, nb)
    tokens: int  # tokens per chunk


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of an HF causal LM (PEFT-wrapped or not)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] == "layers" and len(mod) and \
                hasattr(mod[0], "self_attn"):
            return list(mod)
    raise ValueError("calibrate: no decoder layers found (expected a ModuleList named 'layers' of modules "
                     "with a 'self_attn')")


def _attention_qk(attn: torch.nn.Module, hs: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE q (b, hq, n, hd) and k (b, hkv, n, hd) of an HF attention module."""
    if not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj")):
        raise ValueError(f"calibrate: {type(attn).__name__} has no separate q_proj/k_proj (fused qkv "
                         "projections are not supported by calibration yet)")
    if position_embeddings is None:
        raise ValueError(f"calibrate: {type(attn).__name__} was called without position_embeddings")
    b, n, _ = hs.shape
    hd = attn.head_dim
    q = attn.q_proj(hs).view(b, n, -1, hd)
    k = attn.k_proj(hs).view(b, n, -1, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise ValueError(f"calibrate: no apply_rotary_pos_emb next to {type(attn).__name__}")
    cos, sin = position_embeddings
    return rope(q, k, cos, sin)


@torch.no_grad()
def capture(model: torch.nn.Module, chunks: Iterable[torch.Tensor], block: int = 64,
            progress: bool = True) -> list[LayerCapture]:
    """Run `model` (eager) on each chunk (1, n) of token ids and record every layer's block means and
    oracle matrices. All chunks must have the same length, at least one block."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    chunks = list(chunks)
    if not chunks:
        raise ValueError("calibrate: no calibration chunks (an empty dataset)")
    n = chunks[0].shape[-1]
    if any(c.shape != chunks[0].shape for c in chunks) or chunks[0].dim() != 2 or chunks[0].shape[0] != 1:
        raise ValueError("calibrate: chunks must all be (1, n) token-id tensors of one length")
    if n < block:
        raise ValueError(f"calibrate: chunks of {n} tokens are shorter than one block ({block})")
    rows: dict[int, list] = {i: [] for i in range(len(layers))}

    def hook(i):
        def pre(mod, args, kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            q, k = _attention_qk(mod, hs, kwargs.get("position_embeddings"))
            scale = getattr(mod, "scaling", q.shape[-1] ** -0.5)
            rows[i].append((predictors.block_mean(hs.float(), None, block)[0].cpu(),
                            oracle.block_max_scores(q, k, block)[0].cpu(),
                            oracle.block_attention_mass(q, k, block, scale)[0].cpu()))
        return pre

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    dev = next(model.parameters()).device
    try:
        for ids in tqdm(chunks, desc="calibrate: capture", disable=not progress):
            model(input_ids=ids.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [LayerCapture(i, torch.stack([r[0] for r in rows[i]]), torch.stack([r[1] for r in rows[i]]),
                         torch.stack([r[2] for r in rows[i]]), n) for i in range(len(layers))]


def oracle_scores(cap: LayerCapture, rule: str) -> torch.Tensor:
    """(c, nb) key-block scores of a selection rule (see the module docstring)."""
    if rule == "sum":
        return cap.max_scores.sum(-2)
    if rule == "mean":
        nb = cap.max_scores.shape[-1]
        seen_by = torch.arange(nb, 0, -1, dtype=torch.float32)  # query blocks m >= c
        return cap.max_scores.sum(-2) / seen_by
    if rule == "mass":
        return cap.mass.sum(-2)
    raise ValueError(f"unknown oracle rule {rule!r}; rules: {', '.join(RULES)}")


def kept_blocks(scores: torch.Tensor, keep: float, forced=(0,)) -> torch.Tensor:
    """(c, nb) scores -> (c, nb) bool of the kept blocks, by lemo's own selection rule."""
    c, nb = scores.shape
    fb = selection.resolve_forced(forced, nb)
    k = selection.keep_blocks_count(nb, Fraction(keep).limit_denominator(1 << 16), len(fb))
    idx = selection.select_blocks(scores, torch.ones(c, nb, dtype=torch.bool), k, fb)
    out = torch.zeros(c, nb, dtype=torch.bool)
    return out.scatter_(1, idx, True)


def _mass_kept(cap: LayerCapture, kept: torch.Tensor) -> float:
    """The attention mass that kept queries put on kept keys, over the kept queries' whole mass."""
    keep2 = (kept[:, :, None] & kept[:, None, :]).float()
    rows = cap.mass.sum(-1)  # real tokens per query block
    mass_rows = (rows * kept.float()).sum().item()
    return (cap.mass * keep2).sum().item() / mass_rows if mass_rows else 1.0


def evaluate(scores: torch.Tensor, cap: LayerCapture, keep: float, rule: str, forced=(0,)) -> dict[str, float]:
    """Recall of `rule`'s kept blocks (forced blocks excluded from both sides) by the blocks `scores`
    keep; the attention mass that kept queries put on kept keys (tokens semantics), and that mass over
    the one the "mass" oracle's kept set holds (its blocks receive the most attention)."""
    mine = kept_blocks(scores, keep, forced)
    ref = kept_blocks(oracle_scores(cap, rule), keep, forced)
    free = torch.ones_like(mine)
    free[:, selection.resolve_forced(forced, mine.shape[1])] = False
    hit = (mine & ref & free).sum().item()
    want = (ref & free).sum().item()
    mass = _mass_kept(cap, mine)
    oracle = _mass_kept(cap, ref if rule == "mass" else kept_blocks(oracle_scores(cap, "mass"), keep, forced))
    return {"recall": hit / want if want else 1.0, "mass_kept": mass,
            "mass_vs_oracle": mass / oracle if oracle else 1.0}


# -------------------------------------------------------------------------------------------------
# low-rank predictor
# -------------------------------------------------------------------------------------------------


class LowRankPredictor(torch.nn.Module):
    """Per layer: q' = P_q x_b, k' = P_k x_b for block means x_b, rank r per query head; key block c
    scores sum over query blocks m >= c of the head mean of relu(q'_m . k'_c) (`pooled_qk_scores`
    with these factors as the projections)."""

    def __init__(self, q_factors: list[torch.Tensor], k_factors: list[torch.Tensor], heads: int, rank: int):
        super().__init__()
        self.heads, self.rank = heads, rank
        self.q = torch.nn.ParameterList([torch.nn.Parameter(t.float().clone()) for t in q_factors])
        self.k = torch.nn.ParameterList([torch.nn.Parameter(t.float().clone()) for t in k_factors])

    @classmethod
    def from_file(cls, path: str) -> "LowRankPredictor":
        """The predictors a `save`d file holds (`lemo calibrate`'s output)."""
        meta, factors = load(path)
        layers = range(len(factors))
        return cls([factors[i][0] for i in layers], [factors[i][1] for i in layers], meta["heads"], meta["rank"])

    @classmethod
    def from_model(cls, model: torch.nn.Module, rank: int) -> "LowRankPredictor":
        """Training-free: per query head h (key head g), the best rank-r factorization of the
        bilinear form W_q,h^T W_k,g (truncated SVD; exact for r = head_dim)."""
        qs, ks = [], []
        heads = None
        for layer in decoder_layers(model):
            attn = layer.self_attn
            # on the CPU, where the captures the factors are trained against live (also for a CUDA model)
            wq, wk = _base_weight(attn.q_proj).float().cpu(), _base_weight(attn.k_proj).float().cpu()
            hd = attn.head_dim
            hq, hkv = wq.shape[0] // hd, wk.shape[0] // hd
            if rank > hd:
                raise ValueError(f"calibrate: rank {rank} exceeds the head dimension {hd}")
            heads = hq
            pq, pk = [], []
            for h in range(hq):
                g = h // (hq // hkv)
                a, b = wq[h * hd:(h + 1) * hd], wk[g * hd:(g + 1) * hd]  # (hd, d) each: form a^T b
                qa, ra = torch.linalg.qr(a.t())  # d x hd, hd x hd
                qb, rb = torch.linalg.qr(b.t())
                u, s, vh = torch.linalg.svd(ra @ rb.t())
                root = s[:rank].sqrt()
                pq.append(((qa @ u[:, :rank]) * root).t())  # (r, d)
                pk.append(((qb @ vh[:rank].t()) * root).t())
            qs.append(torch.cat(pq))
            ks.append(torch.cat(pk))
        return cls(qs, ks, heads, rank)

    def scores(self, layer: int, block_means: torch.Tensor) -> torch.Tensor:
        """(c, nb, d) block means -> (c, nb) key-block scores."""
        return predictors.qk_block_scores(block_means, self.q[layer], None, self.k[layer], None,
                                          self.heads, self.heads)

    def params_per_layer(self) -> int:
        return self.q[0].numel() + self.k[0].numel()


def _base_weight(linear: torch.nn.Module) -> torch.Tensor:
    base = getattr(linear, "base_layer", linear)  # PEFT LoRA wraps the frozen Linear
    return base.weight.detach()


def _target(cap: LayerCapture, keep: float, rule: str, objective: str) -> torch.Tensor:
    """(c, nb) what `train` fits for one layer (see OBJECTIVES)."""
    if objective == "kl":
        received = cap.mass.sum(-2)
        return received / received.sum(-1, keepdim=True).clamp_min(1e-30)
    if objective == "kept":
        return kept_blocks(oracle_scores(cap, rule), keep).float()
    raise ValueError(f"unknown calibration objective {objective!r}; objectives: {', '.join(OBJECTIVES)}")


def train(pred: LowRankPredictor, caps: list[LayerCapture], keep: float, rule: str, steps: int = 200,
          lr: float = 3e-3, progress: bool = True, objective: str = "kl") -> list[float]:
    """Fit every layer's factors (standardized scores with a learned scale and offset per layer) to the
    objective: "kl", KL(received block mass || softmax of the scores) per chunk; "kept", binary cross
    entropy against the rule's kept set at `keep`. Returns the final loss per layer."""
    from tqdm.auto import tqdm

    targets = [_target(c, keep, rule, objective) for c in caps]
    affine = torch.nn.Parameter(torch.tensor([[4.0, 0.0]] * len(caps)))
    opt = torch.optim.Adam(list(pred.parameters()) + [affine], lr=lr)
    losses = [math.nan] * len(caps)
    for _ in tqdm(range(steps), desc=f"calibrate: train ({objective})", disable=not progress):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i, cap in enumerate(caps):
            s = pred.scores(cap.layer, cap.block_means)
            z = affine[i, 0] * (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + 1e-6) + affine[i, 1]
            if objective == "kl":
                loss = torch.nn.functional.kl_div(z.log_softmax(-1), targets[i], reduction="batchmean")
            else:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, targets[i])
            losses[i] = loss.item()
            total = total + loss
        total.backward()
        opt.step()
    return losses


# -------------------------------------------------------------------------------------------------
# files
# -------------------------------------------------------------------------------------------------


def fingerprint(model: torch.nn.Module) -> dict:
    """What identifies the model predictors were made for: sizes and a hash of the frozen q/k weights."""
    layers = decoder_layers(model)
    attn = layers[0].self_attn
    digest = hashlib.sha256()
    for layer in layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            w = _base_weight(lin).float().flatten()
            digest.update(w[:: max(1, w.numel() // 4096)].cpu().numpy().tobytes())
    cfg = getattr(model, "config", None)
    return {"model_type": getattr(cfg, "model_type", type(model).__name__), "num_layers": len(layers),
            "hidden_size": _base_weight(attn.q_proj).shape[1], "head_dim": attn.head_dim,
            "num_heads": _base_weight(attn.q_proj).shape[0] // attn.head_dim,
            "num_kv_heads": _base_weight(attn.k_proj).shape[0] // attn.head_dim,
            "weights_sha256": digest.hexdigest()}


def save(path: str, pred: LowRankPredictor, model: torch.nn.Module, block: int, info: dict | None = None) -> None:
    """Write the factors (safetensors) with metadata: format, heads, rank, block size, the model's
    fingerprint and `info` (rule, keep ratio, data ... as the caller records them)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (q, k) in enumerate(zip(pred.q, pred.k)):
        tensors[f"layers.{i}.q"] = q.detach().float().contiguous().cpu()
        tensors[f"layers.{i}.k"] = k.detach().float().contiguous().cpu()
    meta = {"format": FORMAT, "heads": pred.heads, "rank": pred.rank, "block_size": block,
            "model": fingerprint(model), **(info or {})}
    save_file(tensors, path, metadata={"lemo": json.dumps(meta, sort_keys=True)})


def read_metadata(path: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("lemo")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"lemo predictors: cannot read {path!r} as safetensors ({type(e).__name__}: {e})") from e
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"lemo predictors: {path!r} is not a lemo predictor file (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}); make one with lemo_compile.calibrate")
    return meta


def load(path: str) -> tuple[dict, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """(metadata, {layer: (q factors, k factors)})."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    t = load_file(path)
    return meta, {i: (t[f"layers.{i}.q"], t[f"layers.{i}.k"]) for i in range(meta["model"]["num_layers"])}


def check_model(path: str, model: torch.nn.Module) -> None:
    """Raise if the predictors in `path` were made for another model, naming what differs."""
    want = read_metadata(path)["model"]
    have = fingerprint(model)
    diff = [f"{k}: file {want.get(k)!r}, model {have[k]!r}" for k in have if want.get(k) != have[k]]
    if diff:
        raise ValueError(f"lemo predictors {path!r} were made for another model ({'; '.join(diff)})")


# -------------------------------------------------------------------------------------------------
# the whole calibration
# -------------------------------------------------------------------------------------------------


def default_rank(model: torch.nn.Module) -> int:
    """The largest rank per head whose factors stay within 0.12 * hidden^2 parameters per layer."""
    fp = fingerprint(model)
    return max(1, min(fp["head_dim"], int(0.06 * fp["hidden_size"] / fp["num_heads"])))


def run(model: torch.nn.Module, chunks: list[torch.Tensor], out: str, *, block: int = 64, keep: float = 0.4,
        rule: str = "mass", rank: int | None = None, steps: int = 200, held_out: list[torch.Tensor] | None = None,
        progress: bool = True, objective: str = "kl") -> dict:
    """Capture, initialize, train and save predictors for `model` to `out` (safetensors). Resumable:
    the capture (the slow part) is kept next to `out` (`out + ".capture.pt"`) and reused by a later
    call with the same model, chunks and block size. With `held_out` chunks, the report holds the
    recall and kept attention mass per layer of the training-free and trained predictors there."""
    if rule not in RULES:
        raise ValueError(f"unknown oracle rule {rule!r}; rules: {', '.join(RULES)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown calibration objective {objective!r}; objectives: {', '.join(OBJECTIVES)}")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    rank = rank or default_rank(model)
    key = {"model": fingerprint(model), "block": block, "chunks": len(chunks),
           "tokens": hashlib.sha256(b"".join(c.cpu().numpy().tobytes() for c in chunks)).hexdigest()}
    cache = out + ".capture.pt"
    caps = None
    try:
        saved = torch.load(cache, weights_only=False)
        if saved.get("key") == key:
            caps = saved["caps"]
    except FileNotFoundError:
        pass
    if caps is None:
        caps = capture(model, chunks, block, progress)
        torch.save({"key": key, "caps": caps}, cache)
    free = LowRankPredictor.from_model(model, rank)
    pred = LowRankPredictor.from_model(model, rank)
    losses = train(pred, caps, keep, rule, steps=steps, progress=progress, objective=objective)
    report = {"rule": rule, "objective": objective, "keep": keep, "rank": rank, "steps": steps, "block_size": block,
              "params_per_layer": pred.params_per_layer(),
              "params_over_hidden_sq": pred.params_per_layer() / fingerprint(model)["hidden_size"] ** 2,
              "train_loss": losses, "calibration_chunks": len(chunks), "tokens_per_chunk": chunks[0].shape[-1]}
    if held_out:
        evals = capture(model, held_out, block, progress)
        with torch.no_grad():
            report["held_out"] = [{"layer": c.layer,
                                   "training_free": evaluate(free.scores(c.layer, c.block_means), c, keep, rule),
                                   "trained": evaluate(pred.scores(c.layer, c.block_means), c, keep, rule)}
                                  for c in evals]
    save(out, pred, model, block, {k: v for k, v in report.items() if k not in ("held_out", "train_loss")})
    return report
