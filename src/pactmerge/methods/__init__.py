"""Merging methods. Each module registers its methods on import."""

from pactmerge.methods import (  # noqa: F401
    breadcrumbs,
    cart,
    consensus,
    della,
    emr,
    fisher_merge,
    isotropic,
    knots,
    model_stock,
    pcb,
    regmean,
    slerp,
    star,
    tall_masks,
    task_arithmetic,
    ties,
    tsv,
    tsv_c,
    weight_average,
    wudi,
)
