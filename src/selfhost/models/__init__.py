"""Model families: Hugging Face config -> ModelSpec, the decoder, and weight loading."""
