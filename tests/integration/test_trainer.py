"""HF Trainer + PEFT LoRA + lemo for a few steps on CPU; the saved adapter loads as a plain PEFT adapter.
Per-layer compilation (compile_layers) against the reference."""

import pytest
import torch

import lemo_compile
from lemo_compile.backend import clear_records
from lemo_compile import LemoConfig
from lemo_compile.integrations import (compile_for_training, compile_layers, drop_all_ones_attention_mask,
                                      strip_all_ones_attention_mask)
from lemo_compile.reference import decoder_layers, reference_forward, scorer_for
from lemo_compile.testing.models import random_batch, tiny_model, trainable_grads


class Batches(torch.utils.data.Dataset):
    def __init__(self, n_items, seq):
        self.items = [random_batch(256, 1, seq, seed=i) for i in range(n_items)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.items[i].items()}


def test_trainer_steps_and_plain_adapter(tmp_path):
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    model = tiny_model("llama", lora=True)
    model.train()
    compile_for_training(model, LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,)))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=1,
                                          max_steps=3, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True)
    # the batches are unpadded: without their all-ones attention_mask the graph's mask is provably causal
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Batches(3, 200),
                                   data_collator=drop_all_ones_attention_mask(transformers.default_data_collator))
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    out = trainer.train()
    assert out.global_step == 3
    recs = [r for r in lemo_compile.records() if r.rewritten]
    assert recs and recs[-1].sparsify.counters["sparse_layers"] == 3
    assert recs[-1].causal.counters["sdpa_made_causal"] == 4
    after = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    assert any(not torch.equal(before[k], after[k]) for k in before)

    model.save_pretrained(str(tmp_path / "adapter"))
    fresh = tiny_model("llama")  # same seed: the same frozen base weights
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        got = loaded(**random_batch(256, 1, 100, seed=42)).loss
    trained = {k.replace(".default", ""): v for k, v in after.items()}
    loaded_params = {k.replace(".default", ""): v for k, v in loaded.named_parameters() if "lora_" in k}
    assert set(trained) == set(loaded_params)
    for k in trained:
        torch.testing.assert_close(loaded_params[k], trained[k])
    assert torch.isfinite(got)


def test_strip_all_ones_attention_mask_keeps_padded_batches():
    full = random_batch(256, 2, 50, seed=1)
    assert "attention_mask" not in strip_all_ones_attention_mask(full)
    assert set(strip_all_ones_attention_mask(full)) == {"input_ids", "labels"}
    padded = random_batch(256, 2, 50, seed=1, pad_right=[0, 3])
    assert strip_all_ones_attention_mask(padded) is padded
    no_mask = {"input_ids": full["input_ids"]}
    assert strip_all_ones_attention_mask(no_mask) is no_mask
    collate = drop_all_ones_attention_mask(lambda feats: padded if feats == ["pad"] else full)
    assert "attention_mask" in collate(["pad"]) and "attention_mask" not in collate(["full"])


@pytest.mark.parametrize("predictor", ["random", "pooled"])
def test_compile_layers_matches_reference_past_the_recompile_limit(predictor):
    """12 layers compiled one by one: each with its own position's config (random predictor: one graph per
    layer, more than Dynamo's default recompile limit of 8) or grouped by keep ratio (pooled predictor)."""
    model = tiny_model("llama", lora=True, layers=12)
    batch = random_batch(256, 2, 200, seed=3, pad_right=[0, 29])
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0, 11), predictor=predictor, attn_mode="tokens")
    clear_records()
    compile_layers(model, cfg)
    out = model(**batch)
    out.loss.backward()
    grads = trainable_grads(model)
    recs = [r for r in lemo_compile.records() if r.detect and r.detect.layers]
    backends = {r.config.layer_index: r for r in recs}  # one config (named by its first layer) per backend
    assert sorted(backends) == (list(range(12)) if predictor == "random" else [0, 1])
    assert sum(r.sparsify.counters["sparse_layers"] for r in backends.values()) == (10 if predictor == "random" else 1)
    model.zero_grad(set_to_none=True)
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None  # back to eager for the reference
    ref = reference_forward(model, cfg, scorer=scorer_for(model, cfg), **batch)
    ref.output.loss.backward()
    ref_grads = trainable_grads(model)
    torch.testing.assert_close(out.loss, ref.output.loss, rtol=1e-5, atol=0)
    for k in ref_grads:
        scale = ref_grads[k].abs().max()
        assert (grads[k] - ref_grads[k]).abs().max() <= 1e-4 * scale, k
    dense = model(**batch).loss
    assert abs(dense - out.loss) > 1e-4  # the sparse layers really ran sparse


def test_trl_sft_trainer_steps(tmp_path):
    """TRL's SFTTrainer on a model compiled with lemo beforehand (pre-tokenized data, a word-level
    tokenizer built in place: nothing downloaded). TRL's loss needs the attention_mask, so the graph
    keeps HF's mask (no is_causal); token elimination still runs."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token="t0", eos_token="t1", unk_token="t0")
    model = tiny_model("llama", lora=True).train()
    compile_for_training(model, LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,)))
    rows = [random_batch(256, 1, 200, seed=i)["input_ids"][0].tolist() for i in range(3)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=1, max_steps=3, learning_rate=1e-3,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                         max_length=None)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
                             processing_class=tok)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    clear_records()
    out = trainer.train()
    assert out.global_step == 3
    recs = [r for r in lemo_compile.records() if r.rewritten]
    assert recs and recs[-1].sparsify.counters["sparse_layers"] == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(4.0 < x < 7.5 for x in losses)  # ~ln(256) on random tokens
    assert any(not torch.equal(before[k], v.detach()) for k, v in model.named_parameters() if v.requires_grad)
