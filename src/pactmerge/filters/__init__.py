"""Task-vector filters. Each module registers its filters on import."""

from pactmerge.filters import pact  # noqa: F401
