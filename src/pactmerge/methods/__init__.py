"""Merging methods. Each module registers its methods on import."""

from pactmerge.methods import consensus, isotropic, knots, task_arithmetic, ties, tsv, weight_average  # noqa: F401
