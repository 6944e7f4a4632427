"""PyTorch + transformers + PEFT baseline for lexp's dense training-step benchmark (`lexp bench step`).

One optimizer step of LoRA fine-tuning on a randomly initialised OPT-shaped model, the workloads
`lexp bench step` times (`runtime/src/bin/lexp/bench_step.rs`):

* model: `OPTForCausalLM` from an `OPTConfig` of a published shape (opt-125m, opt-350m, opt-1.3b,
  opt-2.7b: vocab 50272, 2048 positions, ReLU, dropout 0; opt-350m post-LN with E = 512), random
  init by transformers (normal, std 0.02) after `torch.manual_seed(seed)`, bf16 weights, attention
  `sdpa` (flash attention through PyTorch's SDPA) and/or `eager` (the paper's baseline);
* PEFT LoRA r, lora_alpha, dropout 0, on the given target modules (PEFT keeps the adapter weights
  in f32 for a bf16 base: `autocast_adapter_dtype=True`, its default);
* batch: B sequences of L random tokens (`torch.Generator` seeded per workload),
  `labels = input_ids` (HF shifts them: B·(L−1) targets, as lexp's packed batch of B sequences
  has); or, with `--data`, the paper's padded setting: B examples of a pre-tokenized file, each
  right-padded to L tokens with an attention mask, labels on the completion only;
* step: forward, loss, backward, gradient clipping to norm 1 (as `lexp finetune`; off in the legacy
  mode), `torch.optim.AdamW` (lr 5e-4, foreach; weight decay 0 as lexp, torch's default 0.01 in
  the legacy mode), `zero_grad(set_to_none=True)`; wall time of each whole step, ended by
  `torch.cuda.synchronize()`; median, min, max of the timed steps after the warm-up ones; peak
  memory (`torch.cuda.max_memory_allocated`, reserved) and device memory in use (total − free).

Usage (GPU machine):
  python3 bench/torch_baseline.py OUT.json
      the original measurement: opt-1.3b, 4 x 512 and 4 x 1024, SDPA, r=4 alpha=8 on q,v,
      5 warm-up + 25 timed steps, no clipping, weight decay 0.01;
  python3 bench/torch_baseline.py --model opt-1.3b --batch 4 --seq 512,1024 --attn sdpa,eager \\
      --iters 25 --warmup 5 --out torch.json
      the workloads of `lexp bench step` (same flags and defaults); its JSON is what
      `lexp bench step --baseline` reads (each run: batch_size, seq_len, attn, median_step_ms).
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

import torch

VOCAB, POS = 50272, 2048
# name: (hidden, layers, heads, ffn, word_embed_proj_dim, pre-LN)
PRESETS = {
    "opt-125m": (768, 12, 12, 3072, 768, True),
    "opt-350m": (1024, 24, 16, 4096, 512, False),
    "opt-1.3b": (2048, 24, 32, 8192, 2048, True),
    "opt-2.7b": (2560, 32, 32, 10240, 2560, True),
}


def build_model(args, attn):
    import peft
    import transformers
    from transformers import OPTConfig, OPTForCausalLM

    h, layers, heads, ffn, e, pre = PRESETS[args.model]
    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=h,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=heads,
        max_position_embeddings=args.max_positions,
        word_embed_proj_dim=e,
        do_layer_norm_before=pre,
        activation_function="relu",
        dropout=0.0,
        attention_dropout=0.0,
        enable_bias=True,
    )
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        try:
            model = OPTForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
        except TypeError:
            model = OPTForCausalLM._from_config(cfg, attn_implementation=attn, torch_dtype=torch.bfloat16)
    model = model.to(device="cuda", dtype=torch.bfloat16)
    model.train()
    if args.peft == "lora":
        lcfg = peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules=args.lora_targets,
            bias="none",
        )
        model = peft.get_peft_model(model, lcfg)
        attn_impl = model.base_model.model.config._attn_implementation
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if args.peft == "bitfit":
            # BitFit: every bias (q, k, v, out_proj, fc1, fc2 and the LayerNorm betas), as
            # lexp's default.
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.requires_grad_(True)
        else:
            add_houlsby(model, h, args.adapter_bottleneck)
        attn_impl = model.config._attn_implementation
    info = {
        "peft_method": args.peft,
        "attn_implementation": attn_impl,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_dtype": str(next(p.dtype for p in model.parameters() if p.requires_grad)),
    }
    return model, info


class Houlsby(torch.nn.Module):
    """A bottleneck adapter `h + up(relu(down(h)))`, `up` zero-initialised (RUNTIME.md 2.7)."""

    def __init__(self, hidden, bottleneck):
        super().__init__()
        self.down = torch.nn.Linear(hidden, bottleneck)
        self.up = torch.nn.Linear(bottleneck, hidden)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(torch.relu(self.down(h)))


def add_houlsby(model, hidden, bottleneck):
    """Houlsby adapters on every decoder layer's attention output (before the residual) and
    fc2 output, through forward hooks; the adapters are the only trainable parameters."""
    for layer in model.model.decoder.layers:
        attn = Houlsby(hidden, bottleneck).to(device="cuda", dtype=torch.bfloat16)
        mlp = Houlsby(hidden, bottleneck).to(device="cuda", dtype=torch.bfloat16)
        layer.attn_adapter, layer.mlp_adapter = attn, mlp

        def on_attn(_module, _inputs, out, adapter=attn):
            if isinstance(out, tuple):
                return (adapter(out[0]),) + tuple(out[1:])
            return adapter(out)

        layer.self_attn.register_forward_hook(on_attn)
        layer.fc2.register_forward_hook(lambda _m, _i, out, adapter=mlp: adapter(out))


def padded_batch(path, batch, seq_len, seed):
    """The paper's padded setting: `batch` examples of a pre-tokenized JSONL file
    (`{"context": [ids], "completion": [ids]}`), drawn with `seed`, each right-padded to
    `seq_len` tokens (OPT's pad id 1) with an attention mask; labels on the completion only
    (-100 on the context and the padding)."""
    import random

    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    picks = random.Random(seed).sample(range(len(rows)), batch)
    ids = torch.full((batch, seq_len), 1, dtype=torch.long)
    mask = torch.zeros((batch, seq_len), dtype=torch.long)
    labels = torch.full((batch, seq_len), -100, dtype=torch.long)
    for i, k in enumerate(picks):
        ctx, comp = rows[k]["context"], rows[k]["completion"]
        seq = (ctx + comp)[:seq_len]
        n = len(seq)
        ids[i, :n] = torch.tensor(seq)
        mask[i, :n] = 1
        labels[i, len(ctx):n] = ids[i, len(ctx):n]
    info = {"file": path, "examples": batch, "padded_to": seq_len, "real_tokens": int(mask.sum()),
            "targets": int((labels[:, 1:] != -100).sum())}
    return ids.cuda(), mask.cuda(), labels.cuda(), info


def time_steps(model, opt, params, args, batch, seq_len, data_seed):
    if args.data:
        ids, mask, labels, data_info = padded_batch(args.data, batch, seq_len, data_seed)
    else:
        g = torch.Generator(device="cuda").manual_seed(data_seed)
        ids = torch.randint(0, VOCAB, (batch, seq_len), device="cuda", generator=g)
        mask, labels, data_info = None, ids, None
    times = []
    for i in range(args.warmup + args.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times, float(loss.detach()), data_info


def driver_version():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("legacy_out", nargs="?", help="legacy mode: the original measurement, written here")
    p.add_argument("--model", default="opt-1.3b", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--seq", default="512,1024", help="tokens per sequence, comma-separated")
    p.add_argument("--tokens", type=int, default=None, help="packed budget: max(1, N // seq) sequences")
    p.add_argument("--attn", default="sdpa", help="attention implementations, comma-separated: sdpa,eager")
    p.add_argument("--peft", default="lora", choices=["lora", "bitfit", "houlsby"],
                   help="PEFT method: lora (PEFT), bitfit (every bias), houlsby (ReLU adapters, hooks)")
    p.add_argument("--adapter-bottleneck", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-positions", type=int, default=POS,
                   help="learned positions (default the published 2048; more for --seq past it)")
    p.add_argument("--data", default=None,
                   help="pre-tokenized JSONL (context/completion ids, e.g. the paper's e2e-paper): "
                        "--batch examples, each padded to --seq tokens, loss on the completion")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    args.seq = [int(s) for s in args.seq.split(",") if s.strip()]
    args.attn = [a.strip() for a in args.attn.split(",") if a.strip()]
    args.lora_targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.legacy_out is not None:
        # The original script: positional OUT, fixed workloads, no clipping, torch's weight decay.
        args.out = args.legacy_out
        args.model, args.batch, args.seq, args.tokens, args.attn = "opt-1.3b", 4, [512, 1024], None, ["sdpa"]
        args.lora_r, args.lora_alpha, args.lora_targets = 4, 8.0, ["q_proj", "v_proj"]
        args.warmup, args.iters, args.lr, args.weight_decay, args.max_grad_norm = 5, 25, 5e-4, 0.01, 0.0
    if args.out is None:
        args.out = "torch_step.json"
    bad = [a for a in args.attn if a not in ("sdpa", "eager")]
    if bad or not args.attn:
        p.error(f"--attn: sdpa and/or eager, not {bad}")
    if args.iters < 1 or args.batch < 1 or not args.seq or min(args.seq) < 1:
        p.error("--iters, --batch and every --seq must be positive")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs, infos, failed = [], {}, []
    for attn in args.attn:
        model, info = build_model(args, attn)
        infos[attn] = info
        params = [p for p in model.parameters() if p.requires_grad]
        for k, seq_len in enumerate(args.seq):
            batch = max(1, args.tokens // seq_len) if args.tokens else args.batch
            # A fresh optimizer per workload, as lexp starts each workload from a fresh AdamW.
            opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
            torch.cuda.reset_peak_memory_stats()
            try:
                times, loss, data_info = time_steps(model, opt, params, args, batch, seq_len, args.seed + 1 + k)
            except torch.OutOfMemoryError as e:
                # Recorded (eager attention at 8k tokens does not fit), the other workloads go on.
                failed.append({"batch": f"{batch}x{seq_len}", "attn": info["attn_implementation"],
                               "error": "CUDA out of memory", "detail": str(e).split(".")[0]})
                print(json.dumps(failed[-1]), flush=True)
                opt = None
                torch.cuda.empty_cache()
                continue
            free, total = torch.cuda.mem_get_info()
            med = statistics.median(times)
            runs.append({
                "batch": f"{batch}x{seq_len}",
                "batch_size": batch,
                "seq_len": seq_len,
                "attn": info["attn_implementation"],
                "tokens": batch * seq_len,
                "data": data_info,
                "median_step_ms": med * 1e3,
                "min_step_ms": min(times) * 1e3,
                "max_step_ms": max(times) * 1e3,
                "tokens_per_s": batch * seq_len / med,
                "steps_timed": len(times),
                "times_ms": [t * 1e3 for t in times],
                "loss_last": loss,
                "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
                "device_used_mib": (total - free) / 2**20,
            })
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "times_ms"}), flush=True)
        del model, params, opt
        torch.cuda.empty_cache()
    h, layers, heads, ffn, e, pre = PRESETS[args.model]
    first = infos[args.attn[0]]
    result = {
        "what": f"PyTorch + transformers + PEFT {args.peft} training step (forward, backward, clipping, AdamW), "
                f"random {args.model} shapes",
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "driver": driver_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **first,
        "attn_implementations": [infos[a]["attn_implementation"] for a in args.attn],
        "model": {"name": args.model, "hidden": h, "layers": layers, "heads": heads, "ffn": ffn,
                  "vocab": VOCAB, "positions": args.max_positions, "word_embed_proj_dim": e, "pre_ln": pre},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "targets": args.lora_targets},
        "settings": {"warmup": args.warmup, "iters": args.iters, "lr": args.lr,
                     "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
                     "seed": args.seed, "legacy": args.legacy_out is not None},
        "runs": runs,
        "failed": failed,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
