"""Merging methods. Each module registers its methods on import."""

from pactmerge.methods import (  # noqa: F401
    consensus,
    fisher_merge,
    isotropic,
    knots,
    regmean,
    task_arithmetic,
    ties,
    tsv,
    weight_average,
)
