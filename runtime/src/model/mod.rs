//! The OPT causal LM as a training model: forward, hand-written backward with frozen base
//! weights, LoRA adapters on a subset of the projections (RUNTIME.md §1.3, §2).
