"""Methods from the papers, registered by name: ``longattn.methods.get(name)``, ``.names(family)``, ``.table()``
(see registry). The subpackages (``prefill``, ``decode``, ``linear``) hold one file per method."""

from longattn.methods.registry import Entry, get, names, register, table

__all__ = ["Entry", "get", "names", "register", "table"]
