"""Reading a finished cache: ``open_cache`` / ``Cache`` (``reader``), ``verify``, ``inspect``, ``plot``."""
