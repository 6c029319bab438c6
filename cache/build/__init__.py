"""``kdcache build``: the teacher run that writes a cache.

``config`` (``BuildConfig``), ``data`` (rows, tokenization, packing), ``fingerprint`` (teacher,
tokenizer, data and settings), ``teacher`` (the batched teacher pass and its extraction),
``lock`` (the local build lock and resume state), ``output`` (where a build writes: a local
directory or object storage), ``pipeline`` (``build_cache``: everything in order), ``estimate``
(``kdcache build --estimate``).
"""
