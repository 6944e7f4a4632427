//! The optimizer of trainable parameters: AdamW exactly as `torch.optim.AdamW`, learning-rate
//! schedules and gradient clipping (RUNTIME.md §2.10).
