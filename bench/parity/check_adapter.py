"""Loads an adapter written by `lexp finetune` with PyTorch + transformers + PEFT and evaluates it.

Checks (RUNTIME.md 3.4, 7.2 "PEFT export"):
* `PeftModel.from_pretrained(base, adapter_dir)` loads every LoRA tensor of the file: each
  `lora_A`/`lora_B` parameter of the wrapped model equals the tensor in
  `adapter_model.safetensors` (a misspelled key would leave PEFT's init there: A random, B zero),
  and the file holds no tensor that maps to no parameter.
* the adapter changes the model (eval loss differs from the base model's);
* the eval loss over the completion targets of `--data` (f32, TF32 off, eval mode; the loss
  definition of `lexp eval` and `peft_finetune.py`: mean NLL over every completion token and the
  final EOS) equals the one lexp reported (`--expect`, e.g. `summary.json`'s `eval_loss_end`).

Usage (GPU machine):
  python3 bench/parity/check_adapter.py --base MODEL_DIR --adapter RUN/adapter \
      --data EVAL.jsonl --expect 5.2939 --out result.json
"""

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from peft_finetune import eval_loss, load_pairs, tokenize  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--expect", type=float, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-batch", type=int, default=64)
    args = ap.parse_args()

    import peft
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer.from_file(os.path.join(args.base, "tokenizer.json"))
    data = tokenize(tok, load_pairs(args.data))

    def base_model():
        m = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, attn_implementation="eager")
        return m.to(device).eval()

    base_loss, targets = eval_loss(base_model(), data, device, args.eval_batch)
    model = PeftModel.from_pretrained(base_model(), args.adapter).to(device).eval()

    # Every tensor of the file is what PEFT holds now.
    saved = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    unmatched, mismatched, matched = [], [], 0
    for key, value in saved.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        if name not in params:
            unmatched.append(key)
            continue
        if not torch.equal(params[name].detach().cpu().float(), value.float()):
            mismatched.append(key)
        matched += 1
    lora_params = [n for n in params if ".lora_A." in n or ".lora_B." in n]

    adapter_loss, _ = eval_loss(model, data, device, args.eval_batch)
    result = {
        "what": "lexp adapter loaded by PEFT: key coverage and eval loss",
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"},
        "base": args.base,
        "adapter": args.adapter,
        "data": args.data,
        "eval_targets": targets,
        "tensors_in_file": len(saved),
        "lora_parameters_in_model": len(lora_params),
        "matched": matched,
        "unmatched_keys": unmatched,
        "mismatched_values": mismatched,
        "base_eval_loss": base_loss,
        "peft_eval_loss": adapter_loss,
        "lexp_eval_loss": args.expect,
        "abs_diff": None if args.expect is None else abs(adapter_loss - args.expect),
    }
    ok = (not unmatched and not mismatched and matched == len(lora_params)
          and abs(adapter_loss - base_loss) > 1e-4
          and (args.expect is None or abs(adapter_loss - args.expect) <= 1e-3))
    result["ok"] = ok
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
