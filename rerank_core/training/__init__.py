"""LoRA fine-tuning of a letter reranker: settings, samples with their loss masks, the trainer, manifests."""
