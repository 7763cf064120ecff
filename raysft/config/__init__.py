"""Typed configuration: YAML -> pydantic -> code.

``sections`` is the schema (the only place defaults live), ``loading`` reads YAML
(``yaml_reader``), applies ``--set`` overrides (``overrides``) and validates (``validation``),
reporting every problem of a file at once. Importing this package imports neither torch nor
ray, so validation and ``--dry-run`` are instant.
"""

from raysft.config.fields import DataFormat, Method, Template
from raysft.config.loading import (
    apply_set,
    drop_sections_of_replaced_method,
    dump_config,
    load_config,
    saved_tree,
    unread_sections,
    unused_settings,
)
from raysft.config.overrides import (
    blame_overrides,
    flat_paths,
    get_path,
    parse_overrides,
    parse_value,
    set_path,
    split_overrides,
)
from raysft.config.search_sections import (
    PromoteSection,
    ResourcesSection,
    SamplerSection,
    SchedulerSection,
    SearchParam,
    SearchSection,
    TrackingSection,
)
from raysft.config.sections import (
    Config,
    DataSection,
    EvalSection,
    LoraSection,
    ModelSection,
    QloraSection,
    SearchSpec,
    TrainSection,
)
from raysft.config.validation import validate_rest, validate_spec, validate_tree
from raysft.config.yaml_reader import read_yaml, yaml_load
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
    "apply_set",
    "drop_sections_of_replaced_method",
    "dump_config",
    "flat_paths",
    "get_path",
    "load_config",
    "blame_overrides",
    "parse_overrides",
    "parse_value",
    "read_yaml",
    "saved_tree",
    "set_path",
    "split_overrides",
    "unread_sections",
    "unused_settings",
    "validate_rest",
    "validate_spec",
    "validate_tree",
    "yaml_load",
]
