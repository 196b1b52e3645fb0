"""Task-vector filters. Each module registers its filters on import."""

from pactmerge.filters import core_subspace, dare, nan, pact, pave  # noqa: F401
