"""Building blocks of decoder-only transformers. Plain numbers in, no transformers imports."""
