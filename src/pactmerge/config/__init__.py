"""The merge configuration: its schema (:mod:`.schema`) and loading from YAML (:mod:`.loading`)."""

from pactmerge.config.loading import config_to_yaml, load_config
from pactmerge.config.schema import DTYPES, MergeConfig, ModelEntry, ModelRef

__all__ = ["DTYPES", "MergeConfig", "ModelEntry", "ModelRef", "config_to_yaml", "load_config"]
