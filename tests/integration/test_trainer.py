"""HF Trainer + PEFT LoRA + lemo for a few steps on CPU; the saved adapter loads as a plain PEFT adapter."""

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.integrations import compile_for_training
from lemo_compile.testing.models import random_batch, tiny_model


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
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Batches(3, 200))
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    out = trainer.train()
    assert out.global_step == 3
    recs = [r for r in lemo_compile.records() if r.rewritten]
    assert recs and recs[-1].sparsify.counters["sparse_layers"] == 3
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
