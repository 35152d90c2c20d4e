"""The run configuration (YAML → pydantic): the schema every layer reads, so it imports none of them.

run.py holds the run's sections; loading.py reads YAML and overrides into any pydantic model; methods.py and objectives.py the settings of each method and
each objective's own section."""

from tunesmith.config.loading import load_yaml_model, parse_overrides
from tunesmith.config.methods import ALL_LINEAR, METHOD_NAMES, LoraSettings, MethodSettings
from tunesmith.config.run import (DEFAULT_MODEL, DataSettings, ModelSettings, ReportSettings, RunConfig, TrainSettings,
                                  dump_config, load_config)

__all__ = ["ALL_LINEAR", "DEFAULT_MODEL", "METHOD_NAMES", "DataSettings", "LoraSettings", "MethodSettings",
           "ModelSettings", "ReportSettings", "RunConfig", "TrainSettings", "dump_config", "load_config",
           "load_yaml_model", "parse_overrides"]
