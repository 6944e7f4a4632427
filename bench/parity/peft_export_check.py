#!/usr/bin/env python3
"""Do lexp's PEFT exports load where their formats say, with the loss lexp reports?

Runs on the GPU machine (torch + transformers + peft). For each case it computes, in f32 with
TF32 off, the mean cross-entropy over the labelled tokens of `--tokens` (a JSONL file written
by `lexp eval --export-tokens`: `input_ids` and unshifted `labels`, -100 where not scored),
each example run alone:

* `merged:<name>=<dir>`: `lexp merge`'s checkpoint through `AutoModelForCausalLM`.
* `peft:<name>=<dir>`: a LoRA adapter directory through `PeftModel.from_pretrained` on
  `--base`, and the same after PEFT's `merge_and_unload()`.

and compares it with the loss lexp printed for the same case (`--expect name=loss`, from
`lexp eval`): the base model with the adapter, on lexp's CPU engine in f32. Writes a JSON
report (`--out`) and exits non-zero when a case differs by more than `--tol` (relative).

Example:
  python bench/parity/peft_export_check.py --base opt-mini --tokens tokens.jsonl \\
      --case merged:lora+bitfit=merged-lb --expect lora+bitfit=3.2101 --out report.json
"""

import argparse
import json
import math
import sys

import torch


def loss_of(model, examples, device):
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]], device=device)
            labels = torch.tensor(ex["labels"][1:], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            keep = labels != -100
            ce = torch.nn.functional.cross_entropy(
                logits[keep], labels[keep], reduction="sum"
            )
            total += ce.item()
            count += int(keep.sum().item())
    return total / max(count, 1), count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="base checkpoint directory")
    ap.add_argument("--tokens", required=True, help="lexp eval --export-tokens JSONL")
    ap.add_argument("--case", action="append", default=[], help="merged:NAME=DIR or peft:NAME=DIR")
    ap.add_argument("--expect", action="append", default=[], help="NAME=LOSS from lexp eval")
    ap.add_argument("--tol", type=float, default=1e-3, help="relative tolerance")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    examples = [json.loads(l) for l in open(args.tokens) if l.strip()]
    expect = {}
    for e in args.expect:
        name, value = e.split("=", 1)
        expect[name] = float(value)

    def load(path):
        m = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )
        return m.to(device).eval()

    report = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "examples": len(examples),
        "tolerance_rel": args.tol,
        "cases": [],
    }
    base_loss, targets = loss_of(load(args.base), examples, device)
    report["base_loss"] = base_loss
    report["targets"] = targets
    failed = False
    for case in args.case:
        kind, rest = case.split(":", 1)
        name, path = rest.split("=", 1)
        rows = []
        if kind == "merged":
            rows.append(("transformers AutoModelForCausalLM on the merged checkpoint", load(path)))
        elif kind == "peft":
            from peft import PeftModel

            pm = PeftModel.from_pretrained(load(args.base), path).to(device).eval()
            rows.append(("peft PeftModel.from_pretrained(base, adapter)", pm))
            rows.append(("peft merge_and_unload()", pm.merge_and_unload().eval()))
        else:
            sys.exit(f"unknown case kind {kind!r} in {case!r}")
        for how, model in rows:
            loss, n = loss_of(model, examples, device)
            want = expect.get(name)
            rel = abs(loss - want) / abs(want) if want is not None else None
            ok = rel is not None and rel <= args.tol and n == targets
            failed |= not ok
            row = {
                "case": name,
                "how": how,
                "loss": loss,
                "lexp_loss": want,
                "rel_diff": rel,
                "differs_from_base": abs(loss - base_loss) > 1e-4 * abs(base_loss),
                "ok": ok,
            }
            report["cases"].append(row)
            print(json.dumps(row))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
