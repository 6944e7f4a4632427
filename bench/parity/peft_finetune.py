"""Baseline: fine-tune a fixture OPT with Hugging Face PEFT LoRA on E2E and report eval loss and time.

This is the PyTorch/PEFT run that the Rust runtime's fine-tuning is compared against (same data,
same hyper-parameters, same loss definition). Recipe:

* model: `<fixtures>/<model>` loaded in float32, `attn_implementation="eager"`, `model.train()`
  (the fixtures have dropout 0); peft LoRA r=8, lora_alpha=16, lora_dropout=0.0,
  target_modules=[q_proj, v_proj], bias="none", default peft init (`torch.manual_seed(0)` before
  wrapping: A kaiming-uniform, B = 0).
* data: `<data>/train.jsonl`, each pair tokenized as RUNTIME 5.2 (`encode(prompt, True)` ++
  `encode(completion, False)` ++ [2]), labels = ids with the prompt positions set to -100.
* order: one `torch.Generator` seeded with 0 at start; at the start of every epoch
  `torch.randperm(n, generator=g)` gives that epoch's order (so the epochs differ, reproducibly).
* step: 16 examples per optimizer step, one micro-batch, right-padded with `<pad>` (1) and an
  attention mask (positions derived from it start at 0 for every row); labels -100 on padding.
  Loss = mean over the valid targets of the step (HF's `ForCausalLMLoss`: shift, f32 upcast).
  bf16 autocast (`torch.autocast("cuda", torch.bfloat16)`), f32 master weights.
  The last step of an epoch takes the remaining examples (4672 = 292 x 16, so none are partial).
* optimizer: `torch.optim.AdamW(lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)`, gradient
  norm clipped to 1.0 (`clip_grad_norm_` over all trainable tensors), linear decay from 5e-4 to 0
  over all steps, no warm-up (lr of step k, 0-based: 5e-4 * (1 - k / total_steps)).
* eval: mean NLL over every completion target (completion tokens and the final EOS) of
  `<data>/eval.jsonl`, float32 with TF32 off, `model.eval()`, no autocast; reported before
  training, after epoch 1 and after epoch 2.

Usage (GPU machine): python3 bench/parity/peft_finetune.py --fixtures .gpu/fixtures --data .gpu/data/e2e \
    --out bench/results/2026-11-29-h200-peft-finetune-opt-mini.json
"""

import argparse
import datetime
import json
import os
import time

import torch

IGNORE = -100
PAD = 1


def load_pairs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenize(tok, pairs):
    """(ids, labels) per pair, RUNTIME 5.2."""
    out = []
    for ex in pairs:
        p = tok.encode(ex["prompt"], add_special_tokens=True).ids
        c = tok.encode(ex["completion"], add_special_tokens=False).ids
        out.append((p + c + [2], [IGNORE] * len(p) + c + [2]))
    return out


def collate(batch, device):
    """Right-padded input_ids, attention_mask and labels for a list of (ids, labels)."""
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    lab = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        lab[i, : len(y)] = torch.tensor(y)
    return ids.to(device), mask.to(device), lab.to(device)


def eval_loss(model, data, device, batch_size):
    """Mean NLL over all valid targets of `data`, f32, eval mode, no autocast."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            ids, mask, lab = collate(data[s : s + batch_size], device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            tgt = lab[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            total += float(nll.double())
            count += int((tgt != IGNORE).sum())
    model.train()
    return total / count, count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default="/work/shared/fixtures")
    ap.add_argument("--data", default="/work/shared/data/e2e")
    ap.add_argument("--model", default="opt-mini")
    ap.add_argument("--out", default="bench/results/2026-11-29-h200-peft-finetune-opt-mini.json")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-batch", type=int, default=64)
    args = ap.parse_args()

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda"
    path = os.path.join(args.fixtures, args.model)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    train = tokenize(tok, load_pairs(os.path.join(args.data, "train.jsonl")))
    evald = tokenize(tok, load_pairs(os.path.join(args.data, "eval.jsonl")))

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").to(device)
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps_per_epoch = (len(train) + args.batch - 1) // args.batch
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, (total_steps - k) / total_steps))

    t0 = time.perf_counter()
    ev0, n_eval = eval_loss(model, evald, device, args.eval_batch)
    eval_time = time.perf_counter() - t0
    evals = [{"after_epoch": 0, "eval_loss": ev0}]
    print(f"eval before training: {ev0:.5f} over {n_eval} targets ({eval_time:.2f}s)", flush=True)

    g = torch.Generator().manual_seed(0)
    curve, epoch_times = [], []
    model.train()
    train_time = 0.0
    for epoch in range(args.epochs):
        order = torch.randperm(len(train), generator=g).tolist()
        torch.cuda.synchronize()
        te = time.perf_counter()
        for s in range(0, len(order), args.batch):
            ids, mask, lab = collate([train[i] for i in order[s : s + args.batch]], device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            curve.append((loss.item(), gn.item()))
        torch.cuda.synchronize()
        dt = time.perf_counter() - te
        train_time += dt
        epoch_times.append(dt)
        ev, _ = eval_loss(model, evald, device, args.eval_batch)
        evals.append({"after_epoch": epoch + 1, "eval_loss": ev})
        mean_train = sum(c[0] for c in curve[-steps_per_epoch:]) / steps_per_epoch
        print(f"epoch {epoch + 1}: train loss (mean of epoch) {mean_train:.5f}, eval {ev:.5f}, {dt:.2f}s", flush=True)
    wall = time.perf_counter() - t0

    result = {
        "what": "HF PEFT LoRA fine-tune baseline (bench/parity/peft_finetune.py)",
        "model": args.model,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
                     "date": datetime.date.today().isoformat()},
        "recipe": {"lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                            "bias": "none", "init": "peft default, torch.manual_seed(0) before get_peft_model"},
                   "trainable_params": n_trainable,
                   "optimizer": {"name": "torch.optim.AdamW", "lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                 "weight_decay": 0.0, "grad_clip": 1.0, "schedule": "linear to 0, no warm-up"},
                   "batch": args.batch, "epochs": args.epochs, "steps_per_epoch": steps_per_epoch,
                   "total_steps": total_steps, "train_examples": len(train),
                   "shuffle": "torch.Generator().manual_seed(0); torch.randperm(n, generator=g) each epoch",
                   "precision": "f32 weights, bf16 autocast for training; eval in f32, TF32 off",
                   "loss": "mean over valid (completion + EOS) targets of the step"},
        "eval": {"examples": len(evald), "targets": n_eval, "losses": evals},
        "train_loss_per_step": [round(c[0], 5) for c in curve],
        "grad_norm_per_step": [round(c[1], 5) for c in curve],
        "time_s": {"train_total": train_time, "per_epoch": epoch_times, "one_eval": eval_time,
                   "wall_including_evals": wall, "ms_per_step": 1000 * train_time / total_steps},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps({k: result[k] for k in ["eval", "time_s"]}))


if __name__ == "__main__":
    main()
