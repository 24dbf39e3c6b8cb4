"""Low-rank adapters (LoRA): PEFT's file format, applying adapters to selfhost's model, merging, fine-tuning."""
