"""Merging methods. Each module registers its methods on import."""

from pactmerge.methods import consensus, isotropic, task_arithmetic, ties, tsv, weight_average  # noqa: F401
