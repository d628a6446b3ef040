"""Dynamic sparse prefill methods: one file, one registered class each (see base.PrefillMethod)."""
