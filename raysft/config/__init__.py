"""Typed configuration: YAML -> pydantic -> code.

``sections`` is the schema (the only place defaults live), ``loading`` reads YAML, applies
``--set`` overrides and validates, reporting every problem of a file at once. Importing this
package imports neither torch nor ray, so validation and ``--dry-run`` are instant.
"""

from raysft.config.loading import (
    dump_config,
    flat_paths,
    get_path,
    load_config,
    parse_overrides,
    parse_value,
    read_yaml,
    saved_tree,
    set_path,
    unread_sections,
    validate_spec,
    validate_tree,
    yaml_load,
)
from raysft.config.sections import (
    Config,
    DataFormat,
    DataSection,
    EvalSection,
    LoraSection,
    Method,
    ModelSection,
    PromoteSection,
    QloraSection,
    ResourcesSection,
    SamplerSection,
    SchedulerSection,
    SearchParam,
    SearchSection,
    SearchSpec,
    Template,
    TrackingSection,
    TrainSection,
)
from raysft.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "DataFormat",
    "DataSection",
    "EvalSection",
    "LoraSection",
    "Method",
    "ModelSection",
    "PromoteSection",
    "QloraSection",
    "ResourcesSection",
    "SamplerSection",
    "SchedulerSection",
    "SearchParam",
    "SearchSection",
    "SearchSpec",
    "Template",
    "TrackingSection",
    "TrainSection",
    "dump_config",
    "flat_paths",
    "get_path",
    "load_config",
    "parse_overrides",
    "parse_value",
    "read_yaml",
    "saved_tree",
    "set_path",
    "unread_sections",
    "validate_spec",
    "validate_tree",
    "yaml_load",
]
