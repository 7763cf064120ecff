"""Cross-field rules of a config and a search spec: each a small function that returns its
message or None, beside the dotted paths it reads (``Rule``). ``sections.Config`` and
``SearchSpec`` apply them in one validator (``apply_rules``), so that every broken rule is
reported in one run, and ``validation`` and ``raysft.search.combinations`` read which rule broke
and what it read (``broken_rules``, ``RULE_INPUTS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationInfo

if TYPE_CHECKING:
    from raysft.config.sections import Config, SearchSpec

# Cross-field rules: (the dotted paths a rule reads, the rule: its message or None). Each is a
# function, not a validator that raises, so that every broken rule is reported in one run,
# and so that a rule whose inputs all validated still runs when another field failed
# (``validation.validate_rest`` validates again without the failed fields, naming them in the
# context: a rule reading one of them is skipped, its input being a default, not the file's).
Rule = tuple[tuple[str, ...], Callable[[Any], "str | None"]]


def apply_rules(cfg: Any, rules: list[Rule], info: ValidationInfo) -> Any:
    context = info.context if isinstance(info.context, dict) else {}
    if context.get("no_rules"):
        return cfg
    dropped, probe = context.get("dropped", ()), context.get("probe", False)
    problems = [msg for _, msg in broken_rules(cfg, rules, dropped, probe=probe)]
    if problems:
        raise ValueError(RULE_SEPARATOR.join(problems))
    return cfg


def broken_rules(
    cfg: Any, rules: list[Rule] | None = None, dropped: Any = (), *, probe: bool = False
) -> list[tuple[tuple[str, ...], str]]:
    """(the paths it reads, its message) of each rule ``cfg`` breaks, those reading a
    ``dropped`` path left out; ``rules``: None for the model's own. ``probe``: ``cfg``'s
    ``method`` is a searched one, set by a probe of the trials' values."""
    from raysft.config.sections import SearchSpec

    if rules is None:
        rules = CONFIG_RULES + (SPEC_RULES if isinstance(cfg, SearchSpec) else [])
    if isinstance(cfg, SearchSpec) and _method_searched(cfg) and not probe:
        # No trial runs the spec's own method: a rule reading it is judged by the probe of
        # each searched method (raysft.search.searchable), which sets it.
        rules = [(i, r) for i, r in rules if "method" not in i or "search.params.method" in i]
    return [
        (inputs, msg)
        for inputs, rule in rules
        if not any(overlaps(i, d) for i in inputs for d in dropped)
        for msg in [rule(cfg)]
        if msg
    ]


def _method_searched(spec: SearchSpec) -> bool:
    searched = spec.search.params.get("method") if spec.search is not None else None
    return bool(searched and searched.values)


# Joins the messages of broken rules into one pydantic error; loading splits them again.
RULE_SEPARATOR = "\n"


def overlaps(a: str, b: str) -> bool:
    """Whether dotted paths ``a`` and ``b`` are the same, or one lies under the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _full_with_dora(cfg: Config) -> str | None:
    if cfg.method == "full" and (cfg.lora.use_dora or cfg.lora.use_rslora):
        return "lora.use_dora/use_rslora are set but method is full"
    return None


def _full_with_half_weights(cfg: Config) -> str | None:
    if cfg.method == "full" and cfg.model.dtype in ("bfloat16", "float16"):
        return (
            f"model.dtype: {cfg.model.dtype} but method is full: full fine-tuning keeps "
            "float32 master weights; set train.precision: bf16 for bf16 compute"
        )
    return None


def _one_step_of_warmup(cfg: Config) -> str | None:
    # The warmup's first step runs at rate 0 (as transformers' schedules do): a run of one
    # step with any warmup would train nothing, and say it trained.
    if cfg.train.max_steps == 1 and cfg.train.warmup() > 0:
        which = "warmup_steps" if cfg.train.warmup_steps is not None else "warmup_ratio"
        return (
            f"train.{which}: {getattr(cfg.train, which)} of train.max_steps 1 is one warmup "
            "step, taken at learning rate 0 (the warmup's first): the run would train nothing; "
            f"set train.{which}: 0"
        )
    return None


def _warmup_past_the_run(cfg: Config) -> str | None:
    t = cfg.train
    # With train.epochs, max_steps is not known yet: checked again once it is (resolve_epochs;
    # a search's searched values in search.spec._epochs_as_steps).
    if t.epochs is not None or not 1 < t.max_steps <= t.warmup():
        return None
    never = (
        "the learning rate would still be rising at the last step, never reaching "
        "train.learning_rate"
    )
    if t.warmup_steps is not None:
        return (
            f"train.warmup_steps: {t.warmup_steps} of train.max_steps {t.max_steps}: {never}; "
            f"set fewer than {t.max_steps}"
        )
    # The largest ratio whose rounded-up steps stay below max_steps, to 4 decimals.
    most = math.floor((t.max_steps - 1) / t.max_steps * 10_000) / 10_000
    return (
        f"train.warmup_ratio: {t.warmup_ratio:g} of train.max_steps {t.max_steps} is "
        f"{t.warmup()} warmup steps (rounded up): {never}; set at most {most:g}"
    )


def _epochs_or_max_steps(cfg: Config) -> str | None:
    # Explicitly set, not the default: a run's length is one or the other.
    if cfg.train.epochs is not None and "max_steps" in cfg.train.model_fields_set:
        return (
            f"train.epochs: {cfg.train.epochs:g} with train.max_steps {cfg.train.max_steps} set "
            "too: a run's length is one or the other; remove train.max_steps (on the command "
            "line: --set train.max_steps=null)"
        )
    return None


def _methods(spec: SearchSpec) -> set[Any]:
    """The methods the trials run: the searched ones, else the spec's."""
    searched = spec.search.params.get("method")
    return set(searched.values) if searched and searched.values else {spec.method}


def _fsdp_is_for_full_fine_tuning(spec: SearchSpec) -> str | None:
    methods = _methods(spec)
    if spec.search.resources.strategy == "fsdp" and methods != {"full"}:
        other = sorted(str(m) for m in methods - {"full"})[0]
        return (
            f"search.resources.strategy: fsdp shards full fine-tuning; method {other} "
            "trains with ddp (its adapters are small: nothing worth sharding)"
        )
    return None


def _compile_is_not_for_fsdp(spec: SearchSpec) -> str | None:
    r = spec.search.resources
    if spec.train.compile and any(r.shards(str(m)) for m in _methods(spec)):
        return (
            f"train.compile: not with FSDP yet (untested here), which search.resources."
            f"strategy {r.strategy} gives method full on {r.workers} workers; set strategy: "
            "ddp or train.compile: false"
        )
    return None


def _8bit_optimizer_is_not_for_fsdp(spec: SearchSpec) -> str | None:
    r = spec.search.resources
    if spec.train.optimizer != "adamw" and any(r.shards(str(m)) for m in _methods(spec)):
        return (
            f"train.optimizer: {spec.train.optimizer} not with FSDP yet (untested here), which "
            f"search.resources.strategy {r.strategy} gives method full on {r.workers} workers; "
            "set strategy: ddp or train.optimizer: adamw"
        )
    return None


def _threads_fit_the_cpus(spec: SearchSpec) -> str | None:
    cpus = spec.search.resources.cpus_per_worker
    threads = spec.train.num_threads
    if threads is not None and threads > max(1.0, cpus):
        return (
            f"train.num_threads: {threads} threads per worker, but search.resources."
            f"cpus_per_worker is {cpus:g}: the workers would oversubscribe the CPUs Ray "
            "reserves for them, slowing their own trial and the ones beside it; set it to "
            "at most cpus_per_worker, or null (Ray then sets OMP_NUM_THREADS to it)"
        )
    return None


def _device_matches_resources(spec: SearchSpec) -> str | None:
    if spec.train.device == "cpu" and spec.search.resources.gpus > 0:
        return (
            "train.device: cpu but search.resources.gpus_per_worker > 0: the trials would "
            "hold GPUs they never use"
        )
    if spec.train.device == "cuda" and spec.search.resources.gpus == 0:
        return (
            "train.device: cuda but search.resources.gpus_per_worker is 0: Ray gives the "
            "trials no GPU (and hides the GPUs from them); set gpus_per_worker to a number "
            "or auto"
        )
    return None


def _flex_attention_needs_a_gpu(spec: SearchSpec) -> str | None:
    if spec.model.attn_implementation != "flex_attention":
        return None
    if spec.search.resources.gpus == 0 or spec.train.device == "cpu":
        return (
            "model.attn_implementation: flex_attention needs a CUDA GPU, but the trials train "
            "on the CPU (search.resources.gpus_per_worker is 0, or train.device: cpu): every "
            "trial would fail; use sdpa, or give the trials GPUs"
        )
    return None


CONFIG_RULES: list[Rule] = [
    (("method", "lora.use_dora", "lora.use_rslora"), _full_with_dora),
    (("method", "model.dtype"), _full_with_half_weights),
    (("train.max_steps", "train.warmup_ratio", "train.warmup_steps"), _one_step_of_warmup),
    (
        ("train.max_steps", "train.warmup_ratio", "train.warmup_steps", "train.epochs"),
        _warmup_past_the_run,
    ),
    (("train.epochs", "train.max_steps"), _epochs_or_max_steps),
]
SPEC_RULES: list[Rule] = [
    (
        ("method", "search.params.method", "search.resources.strategy"),
        _fsdp_is_for_full_fine_tuning,
    ),
    (
        (
            "method",
            "search.params.method",
            "train.compile",
            "search.resources.strategy",
            "search.resources.workers",
        ),
        _compile_is_not_for_fsdp,
    ),
    (
        (
            "method",
            "search.params.method",
            "train.optimizer",
            "search.resources.strategy",
            "search.resources.workers",
        ),
        _8bit_optimizer_is_not_for_fsdp,
    ),  # fmt: skip
    (("train.num_threads", "search.resources.cpus_per_worker"), _threads_fit_the_cpus),
    (("train.device", "search.resources.gpus_per_worker"), _device_matches_resources),
    (
        ("model.attn_implementation", "search.resources.gpus_per_worker", "train.device"),
        _flex_attention_needs_a_gpu,
    ),
]
# The paths each rule reads: parameters read together are probed together first
# (raysft.search.combinations).
RULE_INPUTS: list[tuple[str, ...]] = [inputs for inputs, _ in CONFIG_RULES + SPEC_RULES]
