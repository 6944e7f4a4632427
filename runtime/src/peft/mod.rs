//! Parameter-efficient fine-tuning methods: LoRA's parameters and initialisation, and the
//! Hugging Face PEFT adapter format (RUNTIME.md §2.6, §3).
