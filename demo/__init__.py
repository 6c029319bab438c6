"""The embedded demo: a tiny teacher, its tokenizer and a dataset from the CPython standard library."""

__all__: list[str] = []
