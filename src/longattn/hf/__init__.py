"""Hugging Face transformers integration: model loading (embedded default model, local folders, cached hub ids)."""
