"""Evaluation harness: built-in tasks, zero-shot heads, cached fine-tunes, alpha search, ``pactmerge bench``."""
