"""Config: defaults, all problems at once with file and dotted path, --set typing, search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raysft.config import (
    Config,
    ConfigError,
    TrainSection,
    dump_config,
    get_path,
    load_config,
    parse_overrides,
    parse_value,
    saved_tree,
    set_path,
    unread_sections,
    unused_settings,
    validate_spec,
)


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(
    path: Path | None, overrides: dict[str, Any] | list[str] | None = None
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, authored=True)
    err = info.value
    # The message is one "file: path: problem" line per problem.
    assert str(err).splitlines() == [f"{err.source}: {p}" for p in err.problems]
    return err.problems


# ---------------------------------------------------------------- defaults and paths

REQUIRED = {
    # dotted path -> (--set text, the typed value it must give)
    "model.name_or_path": ("some/model", "some/model"),
    "method": ("full", "full"),
    "lora.r": ("8", 8),
    "lora.alpha": ("16", 16.0),
    "lora.dropout": ("0.1", 0.1),
    "lora.target_modules": ("[q_proj,v_proj]", ["q_proj", "v_proj"]),
    "data.train": ("a.jsonl", "a.jsonl"),
    "data.eval": ("null", None),
    "data.format": ("sharegpt", "sharegpt"),
    "data.template": ("vicuna", "vicuna"),
    "data.max_seq_len": ("256", 256),
    "data.packing": ("false", False),
    "train.learning_rate": ("1e-4", 1e-4),
    "train.neftune_alpha": ("5", 5.0),
    "train.max_steps": ("100", 100),
    "train.seed": ("7", 7),
    "output_dir": ("out/x", "out/x"),
}


def test_defaults_load_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg.method == "lora"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.data.template == "chatml" and cfg.data.format == "auto"
    assert cfg.data.on_error == "strict"
    assert cfg.train.learning_rate == 2e-5
    assert cfg.train.neftune_alpha is None
    assert cfg.search is None


def test_a_file_of_comments_only_is_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing set\n")) == load_config(None)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    # A failed write or the wrong file, more often than a wish for every default.
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.lines() == [f"{path}: empty; write {{}} to use every default"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("train:\n  max_steps: " + "1" * 5000 + "\n", "holds a number of more than 4300 digits"),
        ("x: " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply to be a config"),
        ("tracking:\n  experiment: 2026-13-45\n", "holds a value YAML cannot read (month must "
         "be in 1..12); quote it if it is text"),
    ],
)  # fmt: skip
def test_yaml_python_cannot_read_is_one_message(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.lines() == [f"{path}: {problem}"]


def test_yaml_1_1_octal_and_base_60_numbers_read_as_yaml_1_2(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) read seed: 0123 as 83 and 1:30 as 90.
    path = write(tmp_path, "train:\n  seed: 0123\ntracking:\n  experiment: 1:30\n")
    cfg = load_config(path)
    assert cfg.train.seed == 123 and cfg.tracking.experiment == "1:30"
    with pytest.raises(ConfigError, match=r"train.max_steps: Input should be a valid integer"):
        load_config(write(tmp_path, "train:\n  max_steps: 1:30\n"))
    # What YAML 1.1 read as strings stays so, and a saved config reads back as written.
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    kept = load_config(write(tmp_path, "model:\n  revision: 0189\ntracking:\n  experiment: 0:30\n"))
    assert (kept.model.revision, kept.tracking.experiment) == ("0189", "0:30")


def test_leading_zeros_and_colons_in_a_set_value_read_as_yaml_1_2() -> None:
    # YAML 1.1 read --set lora.r=010 as 8; YAML 1.2 (and a person) as 10, in a mapping too.
    assert load_config(None, parse_overrides(["lora.r=010"])).lora.r == 10
    assert load_config(None, parse_overrides(["train={seed: 0123}"])).train.seed == 123
    assert parse_overrides(["model.revision=1:30"]) == {"model.revision": "1:30"}


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("lora.r=99999999999999999999999999999", "lora.r: Input should be less than or equal "
         "to 4294967295"),
        ("eval.code_timeout_s=2200000", "eval.code_timeout_s: Input should be less than or "
         "equal to 86400"),
        ("eval.code_memory_mb=9000000000000", "eval.code_memory_mb: Input should be less than "
         "or equal to 1048576"),
    ],
)  # fmt: skip
def test_numbers_past_what_the_libraries_take_are_refused(override: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.lines() == [f"<defaults>: --set {problem}"]


@pytest.mark.parametrize("dotted", sorted(REQUIRED))
def test_required_path_exists_and_is_settable(dotted: str) -> None:
    text, value = REQUIRED[dotted]
    default = get_path(load_config(None), dotted)
    assert default != value  # the override must change something to prove it landed
    cfg = load_config(None, parse_overrides([f"{dotted}={text}"]))
    got = get_path(cfg, dotted)
    assert got == value and type(got) is type(value)


def test_dump_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, parse_overrides(["train.learning_rate=1e-4", "data.eval=null"]))
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_a_file_overrides_only_what_it_sets(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  learning_rate: 3.0e-4\nlora:\n  r: 4\n"))
    assert cfg.train.learning_rate == 3e-4 and cfg.lora.r == 4
    assert cfg.train.max_steps == Config().train.max_steps


# ---------------------------------------------------------------- errors


def test_unknown_keys_are_rejected_with_their_dotted_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "train:\n  learning_rat: 1\nmodle: {}\nsearch:\n  params: {lora.r: {type: int, low: 4, "
        "high: 8}}\n  scheduler:\n    kind: x\n",
    )
    assert sorted(problems_of(path)) == [
        "modle: unknown key",
        "search.scheduler.kind: unknown key",
        "train.learning_rat: unknown key",
    ]


def test_every_problem_is_reported_at_once_with_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "train:\n  learning_rate: -1\n  max_stepz: 10\nlora:\n  r: 0\nmethod: lorax\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 4
    assert all(line.startswith(f"{path}: ") for line in lines)
    heads = sorted(line.removeprefix(f"{path}: ").split(":")[0] for line in lines)
    assert heads == ["lora.r", "method", "train.learning_rate", "train.max_stepz"]
    assert f"{path}: train.learning_rate: Input should be greater than 0" in lines


def test_a_union_field_gives_one_line_with_a_clean_path(tmp_path: Path) -> None:
    # data.train is str | list[str]: pydantic reports one error per member, tagged "str" and
    # "list[str]"; the user sees one problem at data.train.
    problems = problems_of(write(tmp_path, "data:\n  train: 5\n  eval: [1]\n"))
    assert len(problems) == 2
    train, evals = sorted(problems)
    assert train.startswith("data.eval: ") and evals.startswith("data.train: ")
    assert "str" in evals and "list" in evals
    assert ".str" not in "".join(problems) and "list[str]." not in "".join(problems)


def test_cross_field_rule_names_both_fields() -> None:
    problems = problems_of(None, {"method": "full", "lora.use_dora": True})
    assert problems == ["lora.use_dora/use_rslora are set but method is full"]


def test_group_by_length_needs_packing_off() -> None:
    assert problems_of(None, {"data.group_by_length": True}) == [
        "--set data: group_by_length: groups unpacked samples by length, but packing is true; "
        "set data.packing: false"
    ]
    cfg = load_config(None, {"data.group_by_length": True, "data.packing": False})
    assert cfg.data.group_by_length and not cfg.data.packing


def test_max_steps_below_eval_every_is_allowed() -> None:
    # The last step always evaluates, so a short run needs no eval_every override.
    cfg = load_config(None, {"train.max_steps": 10, "train.eval_every": 20})
    assert cfg.train.max_steps == 10


def test_yaml_syntax_error_is_one_line_with_position(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  learning_rate: 1e-4\n  max_steps: [1,\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert "\n" not in problems[0]
    assert problems[0].startswith("line 4, column 1: not valid YAML: ")


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "a list"), ("just text\n", "a string")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: top level must be a mapping of sections (model:, data:, ...), got {kind}"
    )


@pytest.mark.parametrize(
    ("value", "kind"),
    [(3, "a number"), ([1, 2], "a list"), ("abc", "a string"), (True, "true/false")],
)
def test_a_section_given_a_value_says_so_without_class_names(value: object, kind: str) -> None:
    assert problems_of(None, {"model": value}) == [
        f"--set model: should be a mapping of its settings (key: value), not {kind}"
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [("lora.r", True), ("train.batch_size", True), ("train.learning_rate", False)],
)  # fmt: skip
def test_true_or_false_for_a_number_is_refused(key: str, value: bool) -> None:
    # pydantic alone reads them as 1 and 0: lora.r: true would train at rank 1.
    assert problems_of(None, {key: value}) == [
        f"--set {key}: should be a number, not {str(value).lower()}"
    ]


def test_true_or_false_where_a_flag_is_meant_stays_one() -> None:
    cfg = load_config(None, {"train.exact_match": False, "data.packing": True})
    assert cfg.train.exact_match is False and cfg.data.packing is True


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("lora.target_modules", 5, "should be a list of strings or 'all-linear', not a number"),
        ("data.train", {"a": 1}, "should be a string or a list of strings, not a mapping"),
        ("search.sampler.startup_trials", "x", "should be a whole number or 'auto', not a string"),
        ("lora.target_modules", [], "should hold at least 1 item, not 0"),
        # true/false for a number (pydantic alone reads 1 and 0), with what else it takes
        ("search.resources.gpus_per_worker", True, "should be a number or 'auto', not true"),
        ("train.neftune_alpha", False, "should be a number or null, not false"),
        ("data.max_eval_samples", True, "should be a number or null, not true"),
    ],
)
def test_a_value_of_no_type_a_field_takes_says_which_it_takes(
    key: str, value: object, problem: str
) -> None:
    # Not pydantic's "as list[str]: Input should be a valid list; as literal['all-linear']: ..."
    tree = {"search": {"params": {"lora.r": {"type": "choice", "values": [4]}}}}
    set_path(tree, key, value)
    with pytest.raises(ConfigError) as info:
        validate_spec(tree)
    assert info.value.problems == [f"{key}: {problem}"]


@pytest.mark.parametrize(
    ("tag", "words"),
    [
        ("literal['all-linear']", "'all-linear'"),
        ("literal['a, b', 'c']", "'a, b' or 'c'"),  # a comma inside a value separates nothing
        ("literal[1, 'x']", "1 or 'x'"),
        ("list[str]", "a list of strings"),
    ],
)
def test_a_union_alternative_in_words(tag: str, words: str) -> None:
    from raysft.config.validation import _member

    assert _member(tag) == words


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_config(path)


# ---------------------------------------------------------------- --set


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-4", 1e-4),
        ("-2E+3", -2000.0),
        ("3", 3),
        ("0.5", 0.5),
        ("true", True),
        ("null", None),
        ("[q_proj,v_proj]", ["q_proj", "v_proj"]),
        ("{a: 1}", {"a": 1}),
        ("all-linear", "all-linear"),
        # float() would take these; YAML does not, and neither do we.
        ("inf", "inf"),
        ("nan", "nan"),
        ("1e", "1e"),
        # Quoted, a number stays text.
        ('"2024"', "2024"),
        ('"1e-4"', "1e-4"),
        # Markup YAML would find in plain text is text: no comment cut off, no mapping.
        ("Be brief # really", "Be brief # really"),
        ("#1 rule", "#1 rule"),
        ("Answer: briefly", "Answer: briefly"),
        ("[1, 2] # c", "[1, 2] # c"),
        ("a#b", "a#b"),
    ],
)
def test_parse_value_is_yaml_typed(text: str, value: Any) -> None:
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_set_overrides_a_file_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  max_steps: 60\n  learning_rate: 3.0e-4\n")
    cfg = load_config(path, parse_overrides(["train.learning_rate=1e-4", "data.eval=null"]))
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.max_steps == 60
    assert cfg.data.eval is None


def test_set_null_unsets_a_setting_that_takes_no_null(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  max_steps: 60\n  learning_rate: 3.0e-4\n")
    cfg = load_config(path, parse_overrides(["train.learning_rate=null", "data.eval=null"]))
    assert cfg.train.learning_rate == TrainSection.model_fields["learning_rate"].default
    assert "learning_rate" not in cfg.train.model_fields_set and cfg.train.max_steps == 60
    assert cfg.data.eval is None  # a setting that takes null is set to it
    # One the file does not set, a section, an unknown key: as before.
    assert load_config(path, parse_overrides(["lora.r=null"])).lora.r == 16
    with pytest.raises(ConfigError, match=r"--set train: "):
        load_config(path, parse_overrides(["train=null"]))
    with pytest.raises(ConfigError, match=r"--set train.nope: "):
        load_config(path, parse_overrides(["train.nope=null"]))


def test_set_of_a_word_that_float_would_parse_stays_a_string() -> None:
    cfg = load_config(None, parse_overrides(["tracking.experiment=nan", "output_dir=inf"]))
    assert (cfg.tracking.experiment, cfg.output_dir) == ("nan", "inf")


def test_set_of_a_string_field_to_another_type_says_to_quote_it() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, parse_overrides(["tracking.experiment=2024"]))
    assert err.value.problems == [
        "--set tracking.experiment: Input should be a valid string (YAML reads the value as "
        "another type: quote it, 'tracking.experiment=\"...\"')"
    ]
    cfg = load_config(None, parse_overrides(['tracking.experiment="2024"']))
    assert cfg.tracking.experiment == "2024"


def test_set_of_a_choice_to_a_yaml_word_says_how_yaml_read_it() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, parse_overrides(["data.template=yes", "method=off", "train.seed=no"]))
    assert err.value.problems == [
        "--set method: Input should be 'full', 'lora' or 'qlora' (YAML reads the value as "
        "false; quote it for the word)",
        "--set data.template: Input should be 'llama2', 'chatml', 'vicuna' or 'tokenizer' (YAML "
        "reads the value as true; quote it for the word)",
        "--set train.seed: should be a number, not false",  # says what it got already
    ]


def test_bad_set_syntax_reports_every_bad_pair() -> None:
    with pytest.raises(ConfigError) as info:
        parse_overrides(["train.max_steps", "=3", "train..seed=1", "train.seed=1"])
    assert info.value.source == "--set"
    assert info.value.problems == [
        "'train.max_steps': expected KEY=VALUE (e.g. train.max_steps=50)",
        "'=3': expected KEY=VALUE (e.g. train.max_steps=50)",
        "'train..seed=1': 'train..seed' is not a dotted path (e.g. train.max_steps)",
    ]


def test_set_values_are_validated_with_their_path(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  learning_rate: 1.0e-4\n")
    problems = problems_of(
        path,
        parse_overrides(["train.learning_rate.x=1", "lora.r=many", "data.template=alpaca"]),
    )
    assert problems[0] == "--set train.learning_rate.x: learning_rate is not a section"
    assert sorted(p.split(":")[0] for p in problems[1:]) == ["--set data.template", "--set lora.r"]


def test_a_set_of_a_section_mapping_keeps_the_files_other_keys(tmp_path: Path) -> None:
    """``--set 'train={max_steps: 4}'`` sets max_steps; it used to put every other key of the
    file's train: section back to its default, without a word."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 2.0e-3\n  batch_size: 8\n", encoding="utf-8")
    cfg = load_config(path, parse_overrides(["train={max_steps: 4, seed: 7}"]))
    assert (cfg.train.max_steps, cfg.train.seed) == (4, 7)
    assert (cfg.train.learning_rate, cfg.train.batch_size) == (2.0e-3, 8)
    # A search parameter given whole replaces the file's (its keys belong to its type).
    tree = {"search": {"params": {"lora.r": {"type": "int", "low": 4, "high": 16}}}}
    set_path(tree, "search.params.lora.r", {"type": "choice", "values": [4, 8]}, merge=True)
    assert tree["search"]["params"]["lora.r"] == {"type": "choice", "values": [4, 8]}


def test_an_unknown_embedded_asset_is_said_with_its_field() -> None:
    """It was said by the run that read it, without the file or the field."""
    problems = problems_of(
        None,
        parse_overrides(["data.eval=embedded:nope.jsonl", "model.name_or_path=embedded:nope"]),
    )
    have = "have: tasks-alpaca.jsonl, "
    assert [p.split(" (")[0] for p in problems] == [
        "--set model.name_or_path: embedded:nope: no such embedded asset",
        "--set data.eval: embedded:nope.jsonl: no such embedded asset",
    ]
    assert all(have in p for p in problems)
    two = parse_overrides(["data.train=[embedded:tasks-alpaca.jsonl, embedded:x.jsonl]"])
    assert problems_of(None, two)[0].startswith(
        "--set data.train: item 1: embedded:x.jsonl: no such embedded asset"
    )


def test_set_of_an_unknown_key_is_rejected() -> None:
    assert problems_of(None, parse_overrides(["train.lr=1e-4"])) == ["--set train.lr: unknown key"]


def test_a_problem_of_a_set_value_is_blamed_on_set_not_on_the_file(tmp_path: Path) -> None:
    """The file's own problems name the file; those of --set values say --set."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_stepz: 3\n", encoding="utf-8")
    problems = problems_of(path, parse_overrides(["lora.r=0", "nosuch.key=1", "train.seed=1"]))
    assert sorted(problems) == [
        "--set lora.r: Input should be greater than 0",
        "--set nosuch: unknown key",
        "train.max_stepz: unknown key",
    ]
    # A section only --set made, which the method never reads: not "remove it from the file".
    path.write_text("method: full\n", encoding="utf-8")
    assert problems_of(path, parse_overrides(["lora.r=8"])) == [
        "--set lora: settings for method lora and qlora only, but method is full: they would be "
        "ignored; remove the section or set method: lora or qlora"
    ]
    # Set to its default (r=16), it was still asked for: refused all the same.
    assert problems_of(path, parse_overrides(["lora.r=16"])) == [
        "--set lora: settings for method lora and qlora only, but method is full: they would be "
        "ignored; remove the section or set method: lora or qlora"
    ]


# ---------------------------------------------------------------- search params

SEARCH = "search:\n  params:\n{params}"


@pytest.mark.parametrize(
    ("param", "problem"),
    [
        ("{type: uniform, low: 0.5, high: 0.1}", "low (0.5) > high (0.1)"),
        ("{type: loguniform, low: 0, high: 1.0e-3}", "loguniform needs low > 0"),
        ("{type: loguniform, low: -1.0e-5, high: 1.0e-3}", "loguniform needs low > 0"),
        ("{type: choice}", "type choice needs a non-empty values list"),
        ("{type: choice, values: []}", "type choice needs a non-empty values list"),
        ("{type: int, low: 1}", "type int needs low and high"),
        ("{type: multiple_of, values: [2]}", "type multiple_of needs of: <dotted path>"),
    ],
)
def test_search_param_validation(tmp_path: Path, param: str, problem: str) -> None:
    path = write(tmp_path, SEARCH.format(params=f"    train.learning_rate: {param}\n"))
    assert problems_of(path) == [f"search.params.train.learning_rate: {problem}"]


def test_every_bad_search_param_is_reported(tmp_path: Path) -> None:
    params = (
        "    train.learning_rate: {type: loguniform, low: 0, high: 1}\n"
        "    lora.r: {type: choice}\n"
        "    lora.dropout: {type: uniform, low: 0.2, high: 0.1, step: 2}\n"
    )
    problems = problems_of(write(tmp_path, SEARCH.format(params=params)))
    assert sorted(problems) == [
        "search.params.lora.dropout.step: unknown key",
        "search.params.lora.r: type choice needs a non-empty values list",
        "search.params.train.learning_rate: loguniform needs low > 0",
    ]


def test_a_valid_search_section_loads(tmp_path: Path) -> None:
    params = (
        "    train.learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-3}\n"
        "    lora.r: {type: choice, values: [4, 8]}\n"
    )
    cfg = load_config(write(tmp_path, SEARCH.format(params=params)))
    assert cfg.search is not None
    assert cfg.search.params["lora.r"].values == [4, 8]
    assert cfg.search.params["train.learning_rate"].low == 1e-5


@pytest.mark.parametrize(("value", "kind"), [(5, "a number"), (None, "empty"), ([1], "a list")])
def test_a_spec_whose_search_is_no_mapping_says_so_not_missing(value: object, kind: str) -> None:
    # As raysft.train says for the same file; and the spec's other problems come with it.
    with pytest.raises(ConfigError) as info:
        validate_spec({"search": value, "train": {"max_stepz": 1}}, source="s.yaml")
    assert info.value.problems == [
        "train.max_stepz: unknown key",
        f"search: should be a mapping of its settings (key: value), not {kind}",
    ]
    with pytest.raises(ConfigError) as info:  # "missing" is for a spec without the key
        validate_spec({"train": {"max_steps": 2}}, source="s.yaml")
    assert info.value.problems == ["search: missing (a search spec needs a search section)"]


def test_a_run_of_one_step_with_warmup_is_refused() -> None:
    """Its one step would be the warmup's first, at learning rate 0: nothing trained."""
    assert problems_of(None, parse_overrides(["train.max_steps=1"])) == [
        "train.warmup_ratio: 0.03 of train.max_steps 1 is one warmup step, taken at "
        "learning rate 0 (the warmup's first): the run would train nothing; set "
        "train.warmup_ratio: 0"
    ]
    assert load_config(None, {"train.max_steps": 1, "train.warmup_ratio": 0.0}).train.max_steps == 1


# ---------------------------------------------------------------- method sections


def test_a_section_no_method_reads_is_refused(tmp_path: Path) -> None:
    assert problems_of(write(tmp_path, "method: lora\nqlora: {quant_type: fp4}\n")) == [
        "qlora: settings for method qlora only, but method is lora: they would be ignored; "
        "remove the section or set method: qlora"
    ]
    # LoRA settings are read by qlora too.
    assert load_config(write(tmp_path, "method: qlora\nlora: {r: 4}\n"), authored=True).lora.r == 4
    # A run's saved config.yaml holds every section: read as it is.
    assert load_config(write(tmp_path, "method: lora\nqlora: {quant_type: fp4}\n")).method == "lora"


def test_set_method_runs_without_the_sections_of_the_files_method(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "method: qlora\nlora: {r: 4}\nqlora: {quant_type: fp4}\n")
    with caplog.at_level("WARNING", logger="raysft.config.loading"):
        full = load_config(path, {"method": "full"}, authored=True)
    assert full.method == "full"
    assert full.lora == Config().lora and full.qlora == Config().qlora
    assert [r.getMessage() for r in caplog.records] == [
        f"--set method=full: the lora: section of {path} is for method lora and qlora only; "
        "running without it",
        f"--set method=full: the qlora: section of {path} is for method qlora only; "
        "running without it",
    ]
    # LoRA keeps the file's lora: and leaves its qlora: out.
    lora = load_config(path, {"method": "lora"}, authored=True)
    assert (lora.lora.r, lora.qlora) == (4, Config().qlora)
    # A section the command line sets too was meant: refused as ever.
    assert problems_of(path, {"method": "full", "lora.r": 8}) == [
        "lora: settings for method lora and qlora only, but method is full: they would be "
        "ignored; remove the section or set method: lora or qlora"
    ]
    # The file's own method, set again, drops nothing; a file's forgotten section is refused,
    # also where the file leaves its method at the default (lora), and a misspelt method is
    # reported as such, with nothing dropped.
    assert load_config(path, {"method": "qlora"}, authored=True).qlora.quant_type == "fp4"
    assert problems_of(write(tmp_path, "method: full\nlora: {r: 4}\n"), {"method": "full"})
    assert problems_of(write(tmp_path, "qlora: {quant_type: fp4}\n"), {"method": "lora"}) == [
        "qlora: settings for method qlora only, but method is lora: they would be ignored; "
        "remove the section or set method: qlora"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="raysft.config.loading"):
        assert [p.split(":")[0] for p in problems_of(path, {"method": "ful"})] == ["--set method"]
    assert caplog.records == []


def test_an_eval_fraction_beside_an_eval_file_is_said_to_have_no_effect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    said = (
        "data.eval_fraction: has no effect, since data.eval names the held-out data "
        "(data.eval: null holds out that share of data.train instead)"
    )
    both = write(tmp_path, "data: {eval: held.jsonl, eval_fraction: 0.3}\n")
    split = write(tmp_path, "data: {eval: null, eval_fraction: 0.3}\n", "split.yaml")
    with caplog.at_level("WARNING", logger="raysft.config.loading"):
        assert load_config(both, authored=True).data.eval_fraction == 0.3  # said, not refused
        load_config(split, authored=True)  # a split of data.train: read
        load_config(None, {"data.eval_fraction": 0.2}, authored=True)  # the default eval file
        load_config(None, {"data.eval_fraction": 0.1}, authored=True)  # the default: unset
        load_config(both)  # a run's saved config.yaml: read as it is
    assert [r.getMessage() for r in caplog.records] == [
        f"{both}: {said}",
        f"<defaults>: {said}",
    ]
    # A spec whose trials search data.eval (null among its values) may read it.
    cfg = Config.model_validate({"data": {"eval_fraction": 0.3}})
    assert unused_settings(cfg) == [said]
    assert unused_settings(cfg, ["data.eval"]) == []
    assert unused_settings(Config(), ["data.eval_fraction"]) == [said]


def test_a_searched_method_that_reads_the_section_makes_it_used(tmp_path: Path) -> None:
    params = "    method: {type: choice, values: [full, lora]}\n"
    text = "method: full\nlora: {r: 4}\n" + SEARCH.format(params=params)
    assert load_config(write(tmp_path, text), authored=True).lora.r == 4


def test_a_searched_parameter_no_trial_reads_is_refused() -> None:
    searched = ["qlora.quant_type", "lora.r"]
    lora = Config(method="lora")
    assert unread_sections(lora, {"method": "lora"}, searched) == [
        "search.params.qlora.quant_type: a setting for method qlora only, but method is lora "
        "(not searched): every trial would ignore it; search another parameter"
    ]
    assert unread_sections(Config(method="qlora"), {}, searched) == []
    full = Config(method="full", lora={"r": 4})
    assert unread_sections(full, {"lora": {"r": 4}}, []) == [
        "lora: settings for method lora and qlora only, but method is full (not searched): "
        "they would be ignored; remove the section or set method: lora or qlora"
    ]
    # A section of defaults changes nothing: a saved config (every section) is not refused.
    everything = Config(method="full").model_dump(mode="json")
    assert unread_sections(Config(method="full"), everything, []) == []


def test_a_searched_method_replaces_the_specs_own_for_every_trial() -> None:
    from raysft.config import validate_spec

    tree = {
        "method": "qlora",
        "qlora": {"quant_type": "fp4"},
        "search": {"params": {"method": {"type": "choice", "values": ["lora", "full"]}}},
    }
    spec = validate_spec(tree)
    assert unread_sections(spec, tree, list(spec.search.params)) == [
        "qlora: settings for method qlora only, but the searched methods are lora, full: they "
        "would be ignored; remove the section or set method: qlora"
    ]
    # raysft.train on the spec runs its own method, qlora, which reads the section.
    assert unread_sections(spec, tree) == []


def test_a_run_saves_no_section_its_method_ignores(tmp_path: Path) -> None:
    # A full trial of a search over methods: the spec's lora section is not saved with it.
    cfg = Config(method="full", lora={"r": 4})
    assert "lora" not in saved_tree(cfg) and "qlora" not in saved_tree(cfg)
    assert "lora" in saved_tree(Config(method="qlora"))
    saved = write(tmp_path, dump_config(cfg), "config.yaml")
    assert load_config(saved, authored=True).method == "full"  # rerun as is


def _takes(check: Any, refused: type[Exception]) -> bool:
    try:
        check()
    except refused:
        return False
    return True


@pytest.mark.parametrize(
    "alias",
    ["champion", "champion-2", "best_v1", "latest", "LATEST", "v1", "V12", "a b", "", "x" * 256],
)
def test_alias_rule_is_mlflows(alias: str) -> None:
    """promote.alias is refused at load exactly when MLflow would refuse it at promotion."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    def mlflow() -> None:
        validation._validate_model_alias_name(alias)
        validation._validate_model_alias_name_reserved(alias)

    ours = _takes(lambda: load_config(None, {"promote.alias": alias}), ConfigError)
    assert ours == _takes(mlflow, MlflowException), alias


@pytest.mark.parametrize(
    "name", ["raysft-adapter", "my model", " ", "", "a/b", "a:b", "..x", ".", "..", "a.", "v1.2"]
)
def test_registered_model_rule_is_mlflows(name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    ours = _takes(lambda: load_config(None, {"promote.registered_model": name}), ConfigError)
    theirs = _takes(lambda: validation._validate_model_name(name), MlflowException)
    if _takes(lambda: validation._validate_model_name("a/b"), MlflowException):
        # An MLflow before its rule on "/", ":" and path-like names (3.10, the oldest raysft takes,
        # checks only that a name is not empty): raysft keeps the later rule, and never takes a name
        # MLflow refuses.
        assert theirs or not ours, name
        return
    assert ours == theirs, name


def test_a_section_with_every_key_commented_out_means_its_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  # name_or_path: x\ntrain:\n  max_steps: 3\ndata:\n")
    cfg = load_config(path)
    assert cfg.model == load_config(None).model and cfg.train.max_steps == 3


def test_target_modules_as_one_string_says_how_to_write_a_list() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, parse_overrides(["lora.target_modules=q_proj,v_proj"]))
    assert err.value.problems == [
        "--set lora.target_modules: 'q_proj,v_proj': a list of module names ([q_proj, v_proj]) "
        "or all-linear"
    ]


def test_a_directory_given_as_the_config_is_said_to_be_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert err.value.problems == ["a directory, not a YAML file"]


def test_a_cloud_uri_as_an_output_directory_is_refused_at_load(tmp_path: Path) -> None:
    """Written with plain file I/O, s3://bucket/x was the directory ./s3:/bucket/x."""
    spec = write(tmp_path, "search:\n  params:\n    lora.r: {type: choice, values: [8, 16]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(
            spec,
            {
                "search.experiment_dir": "s3://bucket/x",
                "promote.export_dir": "gs://bucket/champion",
                "output_dir": "file:///mnt/out",
            },
        )
    why = (
        "a URI; raysft needs a shared filesystem path (NFS/EFS mounted at the same path on "
        "every node), not a cloud URI"
    )
    assert sorted(err.value.problems) == [
        f"--set output_dir: file:///mnt/out: {why}",
        f"--set promote.export_dir: gs://bucket/champion: {why}",
        f"--set search.experiment_dir: s3://bucket/x: {why}",
    ]
    # A path that only holds a colon is a path.
    cfg = load_config(spec, {"search.experiment_dir": "/mnt/nfs/a:b", "output_dir": "o:1"})
    assert cfg.search is not None and cfg.search.experiment_dir == "/mnt/nfs/a:b"


def test_a_leading_tilde_in_a_path_setting_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raysft.config import validate_spec

    monkeypatch.setenv("HOME", str(tmp_path))
    import yaml

    spec = Path(__file__).parents[2] / "search_spaces" / "lora.yaml"
    tree = yaml.safe_load(spec.read_text(encoding="utf-8"))
    tree["model"]["name_or_path"] = "~/models/base"
    tree["data"]["train"] = ["~/d.jsonl", "embedded:tasks-alpaca.jsonl", "~/saved:train"]
    tree["data"]["eval"] = "~/e.jsonl"
    tree["search"]["experiment_dir"] = "~/runs/x"
    tree["tracking"] = {"uri": "sqlite:///~/mlflow.db"}
    tree["promote"] = {"export_dir": "~/champion"}
    tree["output_dir"] = "~/out"
    cfg = validate_spec(tree, source="s.yaml")
    home = str(tmp_path)
    assert cfg.model.name_or_path == f"{home}/models/base"
    assert cfg.data.train == [
        f"{home}/d.jsonl",
        "embedded:tasks-alpaca.jsonl",
        f"{home}/saved:train",
    ]
    assert cfg.data.eval == f"{home}/e.jsonl"
    assert cfg.search is not None and cfg.search.experiment_dir == f"{home}/runs/x"
    assert cfg.tracking.uri == f"sqlite:///{home}/mlflow.db"
    assert cfg.promote.export_dir == f"{home}/champion"
    assert cfg.output_dir == f"{home}/out"
    # Only a leading ~ is a home directory: elsewhere it is part of a name.
    tree["data"]["eval"] = "data/~e.jsonl"
    assert validate_spec(tree, source="s.yaml").data.eval == "data/~e.jsonl"


# ---------------------------------------------------------------- every problem in one run


def test_a_malformed_set_comes_with_the_files_problems(tmp_path: Path) -> None:
    # The pairs as given: the malformed one does not hide the file's problems, nor they it.
    path = write(tmp_path, "train:\n  max_stepz: 3\n")
    assert problems_of(path, ["noequals", "lora.r=0"]) == [
        "--set 'noequals': expected KEY=VALUE (e.g. train.max_steps=50)",
        "--set lora.r: Input should be greater than 0",
        "train.max_stepz: unknown key",
    ]
    missing = tmp_path / "nope.yaml"
    assert problems_of(missing, ["noequals"]) == [
        "file not found",
        "--set 'noequals': expected KEY=VALUE (e.g. train.max_steps=50)",
    ]


def test_every_broken_cross_field_rule_is_reported_with_the_field_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "method: full\nlora: {use_dora: true}\nmodel: {dtype: bfloat16}\ntrain: {max_steps: 0}\n",
    )
    assert problems_of(path) == [
        "train.max_steps: Input should be greater than 0",
        "lora.use_dora/use_rslora are set but method is full",
        "model.dtype: bfloat16 but method is full: full fine-tuning keeps float32 master "
        "weights; set train.precision: bf16 for bf16 compute",
    ]


def test_a_rule_reading_a_value_that_failed_is_left_out(tmp_path: Path) -> None:
    # model.dtype failed: its rule would judge the default, not the file's value; the other
    # rule's inputs validated, so it still speaks.
    path = write(tmp_path, "method: full\nlora: {use_dora: true}\nmodel: {dtype: bf16}\n")
    problems = problems_of(path)
    assert [p.split(":")[0] for p in problems] == [
        "model.dtype",
        "lora.use_dora/use_rslora are set but method is full",
    ]
    # A method that failed: neither rule, each reading it.
    path = write(tmp_path, "method: fulll\nlora: {use_dora: true}\nmodel: {dtype: bfloat16}\n")
    assert [p.split(":")[0] for p in problems_of(path)] == ["method"]


def test_an_unreadable_config_is_one_message(tmp_path: Path) -> None:
    mem = Path("/proc/self/mem")
    if not mem.exists():
        pytest.skip("no /proc/self/mem here")
    assert problems_of(mem) == ["cannot read: Input/output error"]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_is_not_read_as_a_config(device: str) -> None:
    # /dev/zero would be read forever, /dev/stdin on a terminal would wait for input.
    if not Path(device).exists():
        pytest.skip(f"no {device} here")
    assert problems_of(Path(device)) == ["not a regular file"]


def test_a_config_from_a_pipe_is_read(tmp_path: Path) -> None:
    # As the shell passes <(cat lora.yaml): a FIFO, not a regular file.
    import contextlib
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed() -> None:
        # OSError: no reader came (the pipe refused); the assertion says so.
        with contextlib.suppress(OSError):
            fifo.write_text("train:\n  max_steps: 7\n", encoding="utf-8")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        assert load_config(fifo).train.max_steps == 7
    finally:
        if writer.is_alive():  # blocked opening the pipe: a reader lets it go on
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=10)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "train.max_steps: 5\n",
            "train.max_steps: unknown key; write it nested: train: {max_steps: ...}",
        ),
        (
            "search.resources.workers: 2\n",
            "search.resources.workers: unknown key; write it nested: search: {resources: "
            "{workers: ...}}",
        ),
        ("train:\n  lora.r: 5\n", "train.lora.r: unknown key"),  # names no field there
        ("foo.bar: 1\n", "foo.bar: unknown key"),
    ],
)
def test_a_dotted_key_that_names_a_field_says_to_nest_it(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert problems_of(write(tmp_path, text)) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("output_dir: ''\n", "output_dir: empty: give a directory"),
        ("promote: {export_dir: ''}\n", "promote.export_dir: empty: give a directory"),
        ("model: {name_or_path: ' '}\n", "model.name_or_path: empty: give a Hub id"),
        (
            "data: {train: ['', embedded:tasks-alpaca.jsonl]}\n",
            "data.train: item 0 is empty: give a file, directory or hf:NAME",
        ),
        ("data: {eval: [' ']}\n", "data.eval: item 0 is empty"),
    ],
)
def test_an_empty_path_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_an_empty_experiment_dir_is_refused() -> None:
    tree = {"search": {"params": {"lora.r": {"type": "choice", "values": [4, 8]}}}}
    tree["search"]["experiment_dir"] = ""  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        validate_spec(tree)
    assert info.value.problems == [
        "search.experiment_dir: empty: give a directory (empty is the working directory)"
    ]


def test_a_mapping_set_blames_only_the_keys_it_sets(tmp_path: Path) -> None:
    # --set 'train={...}' merges into the file's train: its other settings are still the file's.
    path = write(tmp_path, "train:\n  learning_rate: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, parse_overrides(["train={max_steps: -4, seed: 7}"]))
    assert err.value.lines() == [
        f"{path}: train.learning_rate: Input should be greater than 0",
        f"{path}: --set train.max_steps: Input should be greater than 0",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("null: 2\n", "key null: YAML reads it as null, not a name"),
        ("true: 2\n", "key true: YAML reads it as true/false, not a name"),
        ("train:\n  1.5: 2\n", "train: key 1.5: YAML reads it as a number, not a name"),
    ],
)
def test_a_key_yaml_reads_as_no_string_is_named_as_written(
    tmp_path: Path, text: str, problem: str
) -> None:
    # pydantic's own words were "F: : as None: Keys should be strings" and "1: ..." for true.
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.lines() == [f"{path}: {problem}; quote it, or correct it"]
