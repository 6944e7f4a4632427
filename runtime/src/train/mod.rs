//! The fine-tuning loop: batches, optimizer steps, periodic eval, metrics, checkpoints and
//! resumption.
