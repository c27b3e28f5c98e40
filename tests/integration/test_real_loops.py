"""The loops users run (issue 26): HF Trainer with its collators and TRL's SFTTrainer (defaults, packing,
padding_free, completion-only loss) on a model compiled with lemo beforehand. For one batch from the
trainer's own dataloader and loss function: the loss equals the eager loss of the same batch (the
default modes keep the forward exact), the gradient is finite, every decoder layer sits in one graph (no
graph break inside a layer), and the compile record says which attention and loss path ran: masks
carried as segments (no n x n mask, no user action for an all-ones attention_mask), and the loss either
lemo's segmented one (HF's loss) or none in the layers' graph (TRL computes its own chunked loss)."""

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import clear_records
from lemo_compile.integrations import compile_for_training
from lemo_compile.testing.models import tiny_model

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

LENGTHS = (200, 150, 90, 170)  # documents of mixed length


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")


def _rows():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]


def _check(trainer, model, expect_attention: str, expect_loss: str):
    """One batch of the trainer's dataloader through its compute_loss: compiled vs eager."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    clear_records()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    compiled, model._compiled_call_impl = model._compiled_call_impl, None  # eager for the same batch
    try:
        with torch.no_grad():
            eager = trainer.compute_loss(model, dict(batch))
    finally:
        model._compiled_call_impl = compiled
    torch.testing.assert_close(loss.detach(), eager, rtol=1e-5, atol=1e-6)
    layers = [r for r in lemo_compile.records() if r.detect and r.detect.layers]
    assert len(layers) == 1 and len(layers[0].detect.layers) == 4, [len(r.detect.layers) for r in layers]
    rec = layers[0]
    assert rec.sparsify.counters["sparse_layers"] == 3
    assert expect_attention in rec.attention_path and "mask tensor" not in rec.attention_path, rec.attention_path
    assert rec.loss_path.startswith(expect_loss), rec.loss_path
    return batch, rec


def _model():
    model = tiny_model("llama", lora=True).train()
    compile_for_training(model, LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,)))
    return model


@pytest.mark.parametrize("lengths", ["equal", "mixed"])
def test_hf_trainer_language_modeling_collator(tmp_path, lengths):
    """DataCollatorForLanguageModeling always adds an attention_mask (all ones when nothing is padded):
    no user action, no n x n mask."""
    rows = _rows() if lengths == "mixed" else [r[:90] for r in _rows()]
    tok = _tokenizer()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True,
                                          report_to=[], disable_tqdm=True)
    trainer = transformers.Trainer(model=_model(), args=args,
                                   train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
                                   data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False))
    batch, _ = _check(trainer, trainer.model, "segments (padding)", "segmented")
    assert "attention_mask" in batch and bool((batch["attention_mask"] == 0).any()) == (lengths == "mixed")


@pytest.mark.parametrize("mode", ["default", "packing", "padding_free", "completion_only"])
def test_trl_sft_trainer(tmp_path, mode):
    trl = pytest.importorskip("trl")
    rows = _rows()
    data = {"input_ids": rows}
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to=[],
              disable_tqdm=True, max_length=None, gradient_checkpointing=False)
    if mode == "packing":
        kw.update(packing=True, max_length=256)
    elif mode == "padding_free":
        kw.update(padding_free=True)
    elif mode == "completion_only":
        data["completion_mask"] = [[0] * (len(r) // 2) + [1] * (len(r) - len(r) // 2) for r in rows]
        kw.update(completion_only_loss=True)
    trainer = trl.SFTTrainer(model=_model(), args=trl.SFTConfig(**kw),
                             train_dataset=datasets.Dataset.from_dict(data), processing_class=_tokenizer())
    packed = mode in ("packing", "padding_free")
    batch, _ = _check(trainer, trainer.model, "segments (packed)" if packed else "segments (padding)",
                      "no cross-entropy in this graph")
    assert ("position_ids" in batch and "attention_mask" not in batch) if packed else "attention_mask" in batch
    if mode == "completion_only":
        assert bool((batch["labels"] == -100).any())
