"""PyTorch/HF reference values for the Rust runtime's OPT parity tests (RUNTIME.md section 7).

For each fixture model (opt-tiny, opt-mini) this writes `<out>/<model>.json` with

* the inputs: 3 prompt/completion pairs (the first 3 lines of `eval.jsonl`) tokenized as in
  RUNTIME 5.2 and packed (`cu_seqlens`, completion-only `labels` with -100 on prompt positions);
* the f32 forward of the base model: per-row logsumexp / logit L2 norm / per-row NLL, the first 64
  vocab columns of 4 selected rows, residual-stream norms per layer, and the mean loss over all
  valid targets of the packed batch;
* one LoRA step's gradients (peft, r=4, alpha=8, q_proj and v_proj) with A and B overwritten by a
  closed-form pattern (see `lora_value`) so that Rust can rebuild them exactly: full dA/dB of the
  first and last layer, and the Frobenius norms of every LoRA gradient.

Numerics: float32 weights (the fp16 checkpoint loads exactly), TF32 disabled for matmul and cuDNN,
`attn_implementation="eager"`, `model.eval()` (the fixtures have dropout 0 anyway), lora_dropout 0.

HF does not isolate packed sequences for OPT (RUNTIME 7.1), so every sequence is run alone
(batch of 1, no attention mask, default positions 0..len-1) and the per-sequence results are
concatenated in packed order. Losses are reduced in float64 from the float32 logits:
`loss = sum_t [logsumexp(z_t) - z_t[labels[t+1]]] / N` over positions `t` of each sequence whose next
label is not -100, `N` the number of such targets in the whole packed batch.

Usage (on the GPU machine, see bench/parity/README.md):

    python3 bench/parity/opt_reference.py --fixtures .gpu/fixtures --data .gpu/data/e2e \
        --out runtime/tests/parity [--models opt-tiny opt-mini] [--device cuda]
"""

import argparse
import datetime
import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100
NUM_SEQUENCES = 3
FIRST_COLS = 64
# Order that defines the target index `t` of the LoRA init pattern.
TARGET_ORDER = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LORA_TARGETS = ["q_proj", "v_proj"]
LORA_R = 4
LORA_ALPHA = 8
LORA_INIT_DOC = (
    "For decoder layer l, target index t (position in [q_proj, k_proj, v_proj, out_proj, fc1, fc2], "
    "so q_proj=0, v_proj=2), matrix m (lora_A=0, lora_B=1) and element (i, j) of the stored "
    "[rows, cols] matrix (A is [r, in], B is [out, r]): "
    "value = 0.05 * sin(0.37*i + 0.91*j + 1.3*l + 0.7*t + 2.1*m + 0.5), computed in f64, rounded to f32."
)


def lora_value(rows, cols, layer, target, matrix):
    """The closed-form LoRA init of LORA_INIT_DOC as a float32 numpy array `[rows, cols]`."""
    i = np.arange(rows, dtype=np.float64)[:, None]
    j = np.arange(cols, dtype=np.float64)[None, :]
    v = 0.05 * np.sin(0.37 * i + 0.91 * j + 1.3 * layer + 0.7 * target + 2.1 * matrix + 0.5)
    return v.astype(np.float32)


def f32(x):
    """A float32 value as a short JSON number (9 significant digits round-trip f32 exactly)."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x}")
    return float(f"{x:.9g}")


def f32_list(t):
    """A tensor (any shape) as nested lists of short float32 numbers."""
    a = t.detach().float().cpu().numpy()
    if a.ndim == 0:
        return f32(a)
    return [f32_list_np(r) for r in a] if a.ndim > 1 else [f32(v) for v in a]


def f32_list_np(a):
    return [f32_list_np(r) for r in a] if a.ndim > 1 else [f32(v) for v in a]


def load_examples(path, n):
    """The first `n` prompt/completion pairs of a JSONL file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def build_inputs(tokenizer, examples):
    """Tokenize and pack as RUNTIME 5.2/5.3: BOS+prompt ++ completion ++ EOS; labels mask the prompt."""
    seqs, labels, prompt_lens = [], [], []
    for ex in examples:
        p = tokenizer.encode(ex["prompt"], add_special_tokens=True).ids
        c = tokenizer.encode(ex["completion"], add_special_tokens=False).ids
        assert p[0] == 2, "the fixture tokenizer must prepend </s> (id 2)"
        ids = p + c + [2]
        seqs.append(ids)
        labels.append([IGNORE] * len(p) + c + [2])
        prompt_lens.append(len(p))
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    return seqs, labels, prompt_lens, cu


def versions():
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
    }


def load_model(path, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.to(device)
    model.eval()
    return model


def seq_nll_f64(logits, labels):
    """Per-row NLL (float64) against the next label; None where the next label is -100 or absent."""
    z = logits.double()
    lse = torch.logsumexp(z, dim=-1)
    out = []
    for t in range(z.shape[0]):
        if t + 1 < len(labels) and labels[t + 1] != IGNORE:
            out.append(float(lse[t] - z[t, labels[t + 1]]))
        else:
            out.append(None)
    return out


def forward_reference(model, seqs, labels, cu, device):
    """Base-model forward of every sequence alone, concatenated in packed order."""
    decoder = model.model.decoder
    layers = decoder.layers
    captured = {}

    def pre_hook(_m, args, kwargs):
        captured["embed"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def layer_hook(idx):
        def hook(_m, _args, out):
            captured[idx] = (out[0] if isinstance(out, (tuple, list)) else out).detach()

        return hook

    def final_hook(_m, _args, out):
        captured["final_ln"] = out.detach()

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(layer_hook(i)) for i, layer in enumerate(layers)]
    handles.append(decoder.final_layer_norm.register_forward_hook(final_hook))

    L = len(layers)
    resid_sq = np.zeros(L + 1)  # [0] embeddings (input of layer 0), [i+1] output of layer i
    final_sq = 0.0
    hf_sq = None
    lse_rows, norm_rows, nll_rows, selected, hf_losses = [], [], [], [], []
    all_logits = []
    loss_sum, n_targets = 0.0, 0
    hf_last_is_final_ln = True
    with torch.no_grad():
        for b, (ids, lab) in enumerate(zip(seqs, labels)):
            x = torch.tensor([ids], device=device)
            out = model(input_ids=x, labels=torch.tensor([lab], device=device), output_hidden_states=True)
            logits = out.logits[0].float()
            all_logits.append(logits)
            hf_losses.append(float(out.loss))
            hs = [h[0].double() for h in out.hidden_states]
            sq = np.array([float((h * h).sum()) for h in hs])
            hf_sq = sq if hf_sq is None else hf_sq + sq
            resid_sq[0] += float((captured["embed"][0].double() ** 2).sum())
            for i in range(L):
                resid_sq[i + 1] += float((captured[i][0].double() ** 2).sum())
            final_sq += float((captured["final_ln"][0].double() ** 2).sum())
            hf_last_is_final_ln &= bool(torch.equal(out.hidden_states[-1][0], captured["final_ln"][0]))
            z = logits.double()
            lse_rows += [f32(v) for v in torch.logsumexp(z, dim=-1).cpu()]
            norm_rows += [f32(v) for v in z.norm(dim=-1).cpu()]
            nll = seq_nll_f64(logits, lab)
            nll_rows += [None if v is None else f32(v) for v in nll]
            for v in nll:
                if v is not None:
                    loss_sum += v
                    n_targets += 1
    for h in handles:
        h.remove()

    rows = [cu[b] for b in range(len(seqs))] + [cu[-1] - 1]
    flat_ids = [t for s in seqs for t in s]
    for r in rows:
        b = max(i for i in range(len(seqs)) if cu[i] <= r)
        pos = r - cu[b]
        z = all_logits[b][pos]
        has_next = pos + 1 < len(seqs[b])
        next_id = seqs[b][pos + 1] if has_next else None
        selected.append({
            "row": r,
            "sequence": b,
            "position": pos,
            "token_id": flat_ids[r],
            "logits_first64": f32_list(z[:FIRST_COLS]),
            "next_id": next_id,
            "next_logit": f32(z[next_id]) if has_next else None,
            "argmax": int(z.argmax()),
            "max_logit": f32(z.max()),
        })
    return {
        "row_logsumexp": lse_rows,
        "row_logit_norm": norm_rows,
        "row_nll": nll_rows,
        "selected_rows": selected,
        "residual_norms": [float(math.sqrt(v)) for v in resid_sq],
        "final_ln_norm": float(math.sqrt(final_sq)),
        "hf_hidden_state_norms": [float(math.sqrt(v)) for v in hf_sq],
        "hf_hidden_states_last_is_final_ln": hf_last_is_final_ln,
        "loss": loss_sum / n_targets,
        "loss_sum": loss_sum,
        "num_targets": n_targets,
        "hf_loss_per_sequence": hf_losses,
    }


def lora_modules(peft_model):
    """(layer, target name, lora.Linear module) for every LoRA-wrapped Linear, sorted by layer, target."""
    out = []
    pat = re.compile(r"layers\.(\d+)\.(?:self_attn\.)?(" + "|".join(TARGET_ORDER) + r")$")
    for name, mod in peft_model.named_modules():
        m = pat.search(name)
        if m and hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out.append((int(m.group(1)), m.group(2), mod))
    out.sort(key=lambda e: (e[0], TARGET_ORDER.index(e[1])))
    return out


def lora_reference(model, seqs, labels, device, full_layers):
    """Wrap with peft LoRA, inject the closed-form A/B, one forward+backward of the packed batch."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                     bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    pm.eval()
    mods = lora_modules(pm)
    assert len(mods) == len(model.model.decoder.layers) * len(LORA_TARGETS), mods
    init_stats = []
    with torch.no_grad():
        for layer, tname, mod in mods:
            t = TARGET_ORDER.index(tname)
            A = mod.lora_A["default"].weight
            B = mod.lora_B["default"].weight
            A.copy_(torch.from_numpy(lora_value(A.shape[0], A.shape[1], layer, t, 0)))
            B.copy_(torch.from_numpy(lora_value(B.shape[0], B.shape[1], layer, t, 1)))
            assert mod.scaling["default"] == LORA_ALPHA / LORA_R
            init_stats.append({"layer": layer, "target": tname, "A_shape": list(A.shape), "B_shape": list(B.shape),
                               "A_sum": float(A.double().sum()), "B_sum": float(B.double().sum()),
                               "A_00": f32(A[0, 0]), "B_00": f32(B[0, 0])})
    for p in pm.parameters():
        p.grad = None
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable), trainable

    n_total = sum(1 for lab in labels for t in range(len(lab) - 1) if lab[t + 1] != IGNORE)
    loss_sum = 0.0
    lse_rows = []
    for ids, lab in zip(seqs, labels):
        x = torch.tensor([ids], device=device)
        logits = pm(input_ids=x).logits[0].float()
        tgt = torch.tensor(lab[1:] + [IGNORE], device=device)
        s = F.cross_entropy(logits.double(), tgt, ignore_index=IGNORE, reduction="sum")
        (s / n_total).backward()
        loss_sum += s.item()
        lse_rows += [f32(v) for v in torch.logsumexp(logits.detach().double(), dim=-1).cpu()]

    grads, norms = [], []
    for layer, tname, mod in mods:
        dA = mod.lora_A["default"].weight.grad
        dB = mod.lora_B["default"].weight.grad
        assert dA is not None and dB is not None
        assert torch.isfinite(dA).all() and torch.isfinite(dB).all()
        norms.append({"layer": layer, "target": tname,
                      "dA_norm": float(dA.double().norm()), "dB_norm": float(dB.double().norm())})
        if layer in full_layers:
            grads.append({"layer": layer, "target": tname, "dA": f32_list(dA), "dB": f32_list(dB)})
    return {
        "config": {"r": LORA_R, "lora_alpha": LORA_ALPHA, "scaling": LORA_ALPHA / LORA_R, "lora_dropout": 0.0,
                   "target_modules": LORA_TARGETS, "bias": "none", "use_rslora": False},
        "lora_init": LORA_INIT_DOC,
        "init_check": init_stats,
        "loss": loss_sum / n_total,
        "loss_sum": loss_sum,
        "num_targets": n_total,
        "row_logsumexp": lse_rows,
        "grads": grads,
        "grad_norms": norms,
    }


def run_model(name, args):
    from tokenizers import Tokenizer

    path = os.path.join(args.fixtures, name)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    eval_path = os.path.join(args.data, "eval.jsonl")
    examples = load_examples(eval_path, NUM_SEQUENCES)
    seqs, labels, prompt_lens, cu = build_inputs(tok, examples)
    model = load_model(path, args.device)
    c = model.config
    L = c.num_hidden_layers
    doc = {
        "schema": "lexp-opt-parity-v1",
        "model": name,
        "versions": versions(),
        "settings": {"dtype": "float32", "tf32": False, "attn_implementation": "eager", "mode": "eval",
                     "dropout": 0.0, "per_sequence_forward": True,
                     "float_format": "float32 values written with 9 significant digits; losses/norms float64"},
        "config": {"num_hidden_layers": L, "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
                   "ffn_dim": c.ffn_dim, "vocab_size": c.vocab_size},
        "data": {"source": "data/e2e/eval.jsonl, first 3 lines", "examples": examples},
        "input": {
            "sequences": seqs,
            "input_ids": [t for s in seqs for t in s],
            "labels": [t for lab in labels for t in lab],
            "prompt_lens": prompt_lens,
            "cu_seqlens": cu,
            "positions": [p for s in seqs for p in range(len(s))],
        },
        "forward": forward_reference(model, seqs, labels, cu, args.device),
        "lora": lora_reference(model, seqs, labels, args.device, {0, L - 1}),
    }
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"{name}.json")
    with open(out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    fw, lo = doc["forward"], doc["lora"]
    print(f"{name}: T={cu[-1]} N={fw['num_targets']} loss={fw['loss']:.6f} lora_loss={lo['loss']:.6f} "
          f"hf_losses={[round(v, 6) for v in fw['hf_loss_per_sequence']]} "
          f"hidden_last_is_final_ln={fw['hf_hidden_states_last_is_final_ln']} "
          f"grad_norms(l0 q)={lo['grad_norms'][0]} size={os.path.getsize(out)} B -> {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default="/work/shared/fixtures", help="folder holding opt-tiny/ and opt-mini/")
    ap.add_argument("--data", default="/work/shared/data/e2e", help="folder holding eval.jsonl")
    ap.add_argument("--out", default="runtime/tests/parity", help="output folder for <model>.json")
    ap.add_argument("--models", nargs="+", default=["opt-tiny", "opt-mini"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    for name in args.models:
        run_model(name, args)


if __name__ == "__main__":
    main()
