"""Evaluation: the harness (alpha chosen on validation over one merge, the result tables), the
evaluator kinds of a config's ``evaluation:`` block, and the built-in suites of ``pactmerge bench``."""
