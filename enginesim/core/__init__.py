"""The simulated engine's pure model: scheduler, timing, KV cache, LoRA slots. No I/O, no clock."""
