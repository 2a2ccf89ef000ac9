"""Data: image processing, tokenizer, processor, sources, packing and the Grain pipeline."""
