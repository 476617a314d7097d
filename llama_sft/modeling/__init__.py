"""Models: loading (tokenizer, base model, quantization, LoRA, adapters), the embedded GGUF
model's cache, the CPU attention kernel, and the supervised-position loss."""
