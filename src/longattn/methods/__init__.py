"""Methods from the papers, registered by name (see registry)."""
