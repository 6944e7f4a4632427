"""PyTorch + transformers + PEFT baseline for lexp's dense training-step benchmark.

One optimizer step of LoRA fine-tuning on a randomly initialised OPT-1.3B-shaped model, the shapes
lexp's GPU engine is timed on (`runtime/tests/gpu_engine.rs`, `opt_1_3b_step_time`):

* model: `OPTForCausalLM` from an `OPTConfig` (hidden 2048, 24 layers, 32 heads, ffn 8192,
  vocab 50272, 2048 positions, pre-LN, ReLU, dropout 0), random init (`torch.manual_seed(0)`),
  bf16 weights, `attn_implementation="sdpa"` (flash attention through PyTorch's SDPA);
* PEFT LoRA r=4, lora_alpha=8, dropout 0, target_modules q_proj, v_proj (PEFT keeps the adapter
  weights in f32 for a bf16 base: `autocast_adapter_dtype=True`, its default);
* batch: 4 sequences of L tokens (L = 512 and 1024), random ids, `labels = input_ids` (HF shifts
  them; 4·(L−1) targets, as lexp's packed batch of 4 sequences has);
* step: forward, loss, backward, `torch.optim.AdamW` step (foreach), `zero_grad(set_to_none=True)`;
  wall time of 25 steps after 5 warm-ups, each ended by `torch.cuda.synchronize()`; median reported.

Usage (GPU machine): python3 bench/torch_baseline.py OUT.json
"""

import datetime
import json
import statistics
import sys
import time

import torch

H, LAYERS, HEADS, FFN, VOCAB, POS = 2048, 24, 32, 8192, 50272, 2048
WARMUP, STEPS = 5, 25


def build_model():
    import peft
    import transformers
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        ffn_dim=FFN,
        num_attention_heads=HEADS,
        max_position_embeddings=POS,
        word_embed_proj_dim=H,
        do_layer_norm_before=True,
        activation_function="relu",
        dropout=0.0,
        attention_dropout=0.0,
        enable_bias=True,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        try:
            model = OPTForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
        except TypeError:
            model = OPTForCausalLM._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    model = model.to(device="cuda", dtype=torch.bfloat16)
    model.train()
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")
    model = peft.get_peft_model(model, lcfg)
    info = {
        "attn_implementation": model.base_model.model.config._attn_implementation,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_dtype": str(next(p.dtype for p in model.parameters() if p.requires_grad)),
    }
    return model, info


def time_steps(model, opt, seq_len):
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, seq_len), device="cuda", generator=g)
    times = []
    for i in range(WARMUP + STEPS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return times, float(loss.detach())


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "torch_step.json"
    model, info = build_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    runs = []
    for seq_len in (512, 1024):
        torch.cuda.reset_peak_memory_stats()
        times, loss = time_steps(model, opt, seq_len)
        free, total = torch.cuda.mem_get_info()
        med = statistics.median(times)
        runs.append({
            "batch": f"4x{seq_len}",
            "tokens": 4 * seq_len,
            "median_step_ms": med * 1e3,
            "min_step_ms": min(times) * 1e3,
            "max_step_ms": max(times) * 1e3,
            "tokens_per_s": 4 * seq_len / med,
            "steps_timed": len(times),
            "loss_last": loss,
            "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
            "device_used_mib": (total - free) / 2**20,
        })
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "what": "PyTorch + transformers + PEFT LoRA training step (forward, backward, AdamW), random OPT-1.3B shapes",
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **info,
        "model": {"hidden": H, "layers": LAYERS, "heads": HEADS, "ffn": FFN, "vocab": VOCAB, "positions": POS},
        "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "runs": runs,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
