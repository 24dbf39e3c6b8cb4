"""Training: corpus and tokenizer, the loop, checkpoints, export to a Hugging Face folder."""
