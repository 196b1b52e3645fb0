"""Merging methods. Each module registers its methods on import."""

from pactmerge.methods import isotropic, task_arithmetic  # noqa: F401
