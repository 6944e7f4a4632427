"""transformers reference logits for the Rust runtime's GPT-2 and LLaMA-style forwards
(RUNTIME.md sections 6 and 7; read by `runtime/tests/families.rs`).

For each small random-weight model of CONFIGS this writes `<out>/<name>/`:

* the checkpoint as transformers saves it: `config.json` (+ `generation_config.json` if written)
  and `model.safetensors` (float32, well under 1 MB), so the Rust loader reads exactly what
  `save_pretrained` produces;
* `reference.json` (schema `lexp-families-parity-v1`): the packed batch (`sequences`, flat
  `input_ids`, `position_ids` restarting at 0 per sequence, `cu_seqlens`) and ALL its logits
  `[T][V]` (V = 128, T = 48), float32 values with 9 significant digits, plus per-row logsumexp
  (float64), the versions and checks (see `main`'s printout and bench/parity/README.md).

Weights: the model is built from its config with `torch.manual_seed(seed)`, then every parameter
is redrawn (CPU generator, so a re-run writes the same weights): norm weights 1 + 0.1 N(0,1),
biases 0.1 N(0,1), embeddings and LM head 0.5 N(0,1), other matrices N(0, 1/fan_in); so LayerNorm
biases, norm weights and every bias matter, and logits are O(1-20) rather than near 0.

Numerics: float32, TF32 off, `attn_implementation="eager"`, `model.eval()`, dropout 0. The
reference logits come from the model *reloaded* from the saved directory with
`from_pretrained(dtype=torch.float32)`, and must equal the in-memory model's (`checks.reload_max_abs_diff`, asserted <= 1e-5).
HF does not isolate packed sequences for OPT (RUNTIME 7.1), so, as there, each sequence is run alone
(batch of 1, no mask, positions 0..len-1) and the logits are concatenated in packed order
(`checks.hf_packed_no_mask_vs_alone_max_abs_diff` records what the packed row with restarted
position_ids gives instead; with transformers 5.17 it is rounding only for GPT-2 and LLaMA).

Usage (on the GPU machine; no inputs needed, ~1 minute with the imports):

    python3 bench/parity/families_reference.py [--out runtime/tests/parity/families] \
        [--names gpt2-tied llama-gqa ...] [--device cuda]
"""

import argparse
import datetime
import json
import math
import os

import torch

SCHEMA = "lexp-families-parity-v1"
# Uneven lengths, all within n_positions / max_position_embeddings (64).
SEQ_LENS = [13, 29, 6]
VOCAB = 128
# Files this script writes into a model directory (removed first, so nothing stale remains).
OUTPUT_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "reference.json"]

GPT2_BASE = dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=64,
                  rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None)

# name -> (family, seed, config kwargs)
CONFIGS = {
    # GPT-2 small's settings: gelu_new, 4H MLP, scores / sqrt(hd), tied head.
    "gpt2-tied": ("gpt2", 1, dict(GPT2_BASE, tie_word_embeddings=True)),
    # Scores also / (layer + 1), exact GELU, explicit n_inner, untied lm_head.
    "gpt2-inverse-layer": ("gpt2", 2, dict(GPT2_BASE, scale_attn_by_inverse_layer_idx=True,
                                           activation_function="gelu", n_inner=96, tie_word_embeddings=False)),
    # GQA (4 query heads on 2 KV heads), SiLU gated MLP, untied head, RoPE theta 10000.
    "llama-gqa": ("llama", 3, dict(LLAMA_BASE, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # ReLU gate, biases on q/k/v/o and the MLP, head_dim 32 != H/nh = 16, tied head, theta 5e5.
    "llama-relu-bias": ("llama", 4, dict(LLAMA_BASE, hidden_act="relu", attention_bias=True, mlp_bias=True,
                                         head_dim=32, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}


def f32(x):
    """A float32 value as a short JSON number (9 significant digits round-trip f32 exactly)."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x}")
    return float(f"{x:.9g}")


def versions():
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
    }


def make_config(family, kwargs):
    from transformers import GPT2Config, LlamaConfig

    if family == "gpt2":
        return GPT2Config(**kwargs)
    try:
        return LlamaConfig(**kwargs)
    except TypeError:
        # transformers < 5: no rope_parameters; the same RoPE through rope_theta.
        kw = dict(kwargs)
        kw["rope_theta"] = kw.pop("rope_parameters")["rope_theta"]
        return LlamaConfig(**kw)


def randomize(model, seed):
    """Redraws every parameter (see the module doc); tied parameters are drawn once."""
    from torch import nn

    gen = torch.Generator().manual_seed(seed)

    def normal(p, std, mean=0.0):
        p.copy_(mean + std * torch.randn(p.shape, generator=gen, dtype=torch.float32))

    done = set()
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) in done:
                    continue
                done.add(id(p))
                kind = type(mod).__name__
                if p.ndim == 1 and p_name == "weight":  # LayerNorm / RMSNorm weight
                    normal(p, 0.1, 1.0)
                elif p.ndim == 1:  # biases
                    normal(p, 0.1)
                elif isinstance(mod, nn.Embedding) or mod_name.endswith("lm_head"):
                    normal(p, 0.5)
                elif kind == "Conv1D":  # GPT-2: weight [in, out]
                    normal(p, p.shape[0] ** -0.5)
                elif isinstance(mod, nn.Linear):  # weight [out, in]
                    normal(p, p.shape[1] ** -0.5)
                else:
                    raise ValueError(f"unexpected parameter {mod_name}.{p_name} of a {kind}")
    return model


def build(family, seed, kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(family, kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = randomize(model.float(), seed)
    model.eval()
    return model


def save(model, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for f in OUTPUT_FILES:
        path = os.path.join(out_dir, f)
        if os.path.exists(path):
            os.remove(path)
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    except TypeError:
        # Versions without the argument always write safetensors.
        model.save_pretrained(out_dir)
    st = os.path.join(out_dir, "model.safetensors")
    assert os.path.isfile(st), f"{out_dir}: save_pretrained wrote no model.safetensors"
    size = os.path.getsize(st)
    assert size < 1 << 20, f"{st} is {size} bytes; keep the checkpoints under 1 MB"
    return size


def load(out_dir, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    model.to(device)
    model.eval()
    return model


def alone_logits(model, seqs, device):
    """Each sequence alone (batch 1, no mask, positions 0..len-1), logits concatenated [T, V]."""
    out = []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids], device=device)
            out.append(model(input_ids=x, use_cache=False).logits[0].float())
    return torch.cat(out, dim=0)


def packed_logits(model, flat, positions, device):
    """The whole packed stream as one row with restarted position_ids and no mask (for the record
    only: whether HF isolates packed sequences this way depends on the model and version)."""
    with torch.no_grad():
        x = torch.tensor([flat], device=device)
        p = torch.tensor([positions], device=device)
        return model(input_ids=x, position_ids=p, use_cache=False).logits[0].float()


def run(name, args):
    family, seed, kwargs = CONFIGS[name]
    out_dir = os.path.join(args.out, name)
    model = build(family, seed, kwargs)
    size = save(model, out_dir)
    model.to(args.device)

    gen = torch.Generator().manual_seed(1000 + seed)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in SEQ_LENS]
    flat = [t for s in seqs for t in s]
    positions = [p for s in seqs for p in range(len(s))]
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))

    ref = load(out_dir, args.device)
    logits = alone_logits(ref, seqs, args.device)
    in_memory = alone_logits(model, seqs, args.device)
    reload_diff = float((logits - in_memory).abs().max())
    # Same weights and kernels: equal up to (normally no) run-to-run rounding; a head or weight
    # that did not survive the save would differ by O(1).
    assert reload_diff <= 1e-5, f"{name}: reloaded model differs from the saved one by {reload_diff}"
    packed_diff = float((packed_logits(ref, flat, positions, args.device) - logits).abs().max())

    with open(os.path.join(out_dir, "config.json")) as f:
        saved_config = json.load(f)
    z = logits.double()
    doc = {
        "schema": SCHEMA,
        "name": name,
        "family": family,
        "seed": seed,
        "versions": versions(),
        "settings": {"dtype": "float32", "tf32": False, "attn_implementation": "eager", "mode": "eval",
                     "per_sequence_forward": True,
                     "weights": "norm weights 1+0.1N, biases 0.1N, embeddings/lm_head 0.5N, "
                                "other matrices N(0, 1/fan_in); torch.Generator seeded with `seed`",
                     "float_format": "float32 values with 9 significant digits; logsumexp float64"},
        "config": saved_config,
        "input": {
            "sequences": seqs,
            "input_ids": flat,
            "position_ids": positions,
            "cu_seqlens": cu,
        },
        "logits": [[f32(v) for v in row] for row in logits.cpu()],
        "row_logsumexp": [float(v) for v in torch.logsumexp(z, dim=-1).cpu()],
        "max_abs_logit": float(z.abs().max()),
        "checks": {
            "reload_max_abs_diff": reload_diff,
            "hf_packed_no_mask_vs_alone_max_abs_diff": packed_diff,
            "safetensors_bytes": size,
        },
    }
    path = os.path.join(out_dir, "reference.json")
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    names = sorted(os.listdir(out_dir))
    print(f"{name}: T={cu[-1]} V={logits.shape[1]} max|logit|={doc['max_abs_logit']:.3f} "
          f"reload_diff={reload_diff} hf_packed_vs_alone={packed_diff:.3e} safetensors={size} B "
          f"reference={os.path.getsize(path)} B files={names}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runtime/tests/parity/families",
                    help="output root; each model goes to <out>/<name>/")
    ap.add_argument("--names", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    for name in args.names:
        run(name, args)


if __name__ == "__main__":
    main()
