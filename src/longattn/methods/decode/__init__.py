"""Decode-time KV policies: one file, one registered class each (see base.DecodePolicy)."""
