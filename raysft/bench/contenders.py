"""One training function per contender family. Each trains ``ctx.steps`` optimizer steps and
returns the trained model; the ``StepClock`` in ``ctx`` records time, real tokens and loss.

Changes made to the seed's worked example (SEED.md section 6) so that it runs here and compares
like with like, everything else as written (pad to 512, labels = input_ids with pad = eos, so it
trains on prompt and padding; no eval split in its own recipe):
micro-batch 8 and no gradient accumulation (was 4 x 4), ``max_steps`` instead of 3 epochs, the
preset's learning rate (2e-5 is for a 7B model), ``report_to="none"`` (was wandb), no checkpoint
saves, a generated row list instead of ``load_dataset`` (not timed), logging every step (for the
final loss); on the CPU preset full fine-tuning in fp32 (``seed-bf16`` keeps ``bf16=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysft.bench.measure import StepClock, count_real_tokens


@dataclass
class Context:
    model_dir: Path
    workdir: Path
    device: str
    rows: list[dict[str, str]]
    eval_rows: list[dict[str, str]]
    batch_size: int
    max_len: int
    steps: int
    seed: int
    threads: int | None
    clock: StepClock


def _lora_config(opt: dict[str, Any]) -> Any:
    from peft import LoraConfig

    lora = opt.get("lora") or {}
    targets = lora.get("target_modules", ["q_proj", "v_proj"])
    return LoraConfig(
        r=lora.get("r", 16),
        lora_alpha=lora.get("alpha", 32),
        target_modules=targets,
        lora_dropout=lora.get("dropout", 0.05),
        task_type="CAUSAL_LM",
    )


def _clock_callback(clock: StepClock, counter: dict[str, int]) -> Any:
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.step(counter["tokens"])

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    return _Clock()


def _count_tokens(model: Any, counter: dict[str, int]) -> None:
    """Count the real tokens of every training forward pass the trainer makes."""

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if module.training:
            counter["tokens"] += count_real_tokens(kwargs)

    model.register_forward_pre_hook(hook, with_kwargs=True)


def _trainer_args(ctx: Context, opt: dict[str, Any], name: str) -> dict[str, Any]:
    """TrainingArguments shared by the seed and TRL: the preset's steps, batch, rate, warmup."""
    return {
        "output_dir": str(ctx.workdir / name),
        "max_steps": ctx.steps,
        "per_device_train_batch_size": ctx.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": opt["lr"],
        "warmup_steps": 0.03,  # a float < 1 is a ratio (the seed's warmup_ratio=0.03)
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": ctx.seed,
        "use_cpu": ctx.device == "cpu",
        "dataloader_pin_memory": ctx.device == "cuda",
    }


def run_seed(ctx: Context, opt: dict[str, Any], name: str) -> Any:
    """SEED.md section 6 with the changes listed in the module docstring."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from raysft.bench.data import seed_text

    dtype = torch.bfloat16 if opt.get("weights_bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    if opt.get("method", "full") == "lora":
        model = get_peft_model(model, _lora_config(opt))
    enc = tokenizer(
        [seed_text(r) for r in ctx.rows],
        truncation=True,
        max_length=ctx.max_len,
        padding="max_length",
    )
    dataset = [
        {"input_ids": i, "attention_mask": m}
        for i, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)
    ]
    args = TrainingArguments(**_trainer_args(ctx, opt, name), bf16=bool(opt.get("bf16")))
    counter = {"tokens": 0}

    def collate(data: list[dict[str, Any]]) -> dict[str, Any]:  # the seed's lambda
        return {
            "input_ids": torch.stack([torch.tensor(d["input_ids"]) for d in data]),
            "attention_mask": torch.stack([torch.tensor(d["attention_mask"]) for d in data]),
            "labels": torch.stack([torch.tensor(d["input_ids"]) for d in data]),
        }

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,  # type: ignore[arg-type]
        data_collator=collate,
        callbacks=[_clock_callback(ctx.clock, counter)],
    )
    return _train(trainer, counter)


def _train(trainer: Any, counter: dict[str, int]) -> Any:
    """Count the real tokens of every training forward, train, return the trained model."""
    _count_tokens(trainer.model, counter)
    trainer.train()
    return trainer.model


def run_trl(ctx: Context, opt: dict[str, Any], name: str) -> Any:
    """TRL's SFTTrainer on prompt-completion rows (loss on the completion, EOS appended); the
    model is given by path so TRL loads it its own way."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from raysft.bench.data import prompt_text

    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    dataset = Dataset.from_list(
        [{"prompt": prompt_text(r), "completion": r["output"]} for r in ctx.rows]
    )
    knobs = (
        "bf16",
        "gradient_checkpointing",
        "packing",
        "padding_free",
        "max_length",
        "train_sampling_strategy",  # group_by_length: batches of like lengths, as raysft's
        "torch_compile",
    )
    kwargs = {**_trainer_args(ctx, opt, name), "max_length": ctx.max_len}
    args = SFTConfig(**{**kwargs, **{k: opt[k] for k in knobs if k in opt}})
    counter = {"tokens": 0}
    lora = _lora_config(opt) if opt.get("method", "full") == "lora" else None
    trainer = SFTTrainer(
        model=str(ctx.model_dir),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[_clock_callback(ctx.clock, counter)],
    )
    return _train(trainer, counter)


def _raysft_config(ctx: Context, opt: dict[str, Any], name: str) -> Any:
    from raysft.bench.data import write_messages
    from raysft.config import Config

    train = write_messages(ctx.rows, ctx.workdir / "train.jsonl")
    held = write_messages(ctx.eval_rows, ctx.workdir / "eval.jsonl")
    lora = dict(opt.get("lora") or {})
    return Config.model_validate(
        {
            "model": {
                "name_or_path": str(ctx.model_dir),
                "attn_implementation": opt.get("attn", "sdpa"),
            },
            "method": opt.get("method", "full"),
            "lora": lora,
            "data": {
                "train": str(train),
                "eval": str(held),
                "format": "messages",
                "template": "tokenizer",  # data.CHAT_TEMPLATE: the seed's text + EOS
                "max_seq_len": opt.get("row_len", ctx.max_len),
                "packing": opt.get("packing", True) and not opt.get("group_by_length"),
                "group_by_length": bool(opt.get("group_by_length")),
                "max_eval_samples": None,
            },
            "train": {
                "learning_rate": opt["lr"],
                "lr_scheduler": "linear",
                "warmup_ratio": 0.03,
                "batch_size": ctx.batch_size,
                "grad_accum": 1,
                "max_steps": ctx.steps,
                "eval_every": ctx.steps,
                "exact_match": False,
                "eval_base": False,
                "gradient_checkpointing": bool(opt.get("gradient_checkpointing")),
                "compile": bool(opt.get("compile")),
                "precision": opt.get("precision", "auto"),
                "seed": ctx.seed,
                "num_threads": ctx.threads,
            },
            "output_dir": str(ctx.workdir / name),
        }
    )


def raysft_run(ctx: Context, opt: dict[str, Any], name: str) -> Any:
    """raysft's ``setup`` (data, packing, model, optimizer) with the contender's options."""
    from raysft.train import recipe

    run = recipe.setup(_raysft_config(ctx, opt, name), dist=recipe.Dist())
    if opt.get("selective_logits"):
        use_selective_logits(run.model)
    run.model.train()
    return run


def run_raysft(ctx: Context, opt: dict[str, Any], name: str) -> Any:
    """raysft's own recipe: ``setup``, then its training step ``steps`` times; the loop alone
    is timed (no evals or checkpoints inside it)."""
    from raysft.train import recipe

    run = raysft_run(ctx, opt, name)
    tokens = 0
    ctx.clock.begin()
    for _ in range(ctx.steps):
        record = recipe.train_step(run)
        tokens += record["tokens"]
        ctx.clock.step(tokens, record["train_loss"])
    return run.model


def use_selective_logits(model: Any) -> None:
    """Experiment: for ``model``, the LM head and cross-entropy run only at the positions the
    loss scores (hidden states selected before the head), not at every position."""
    import torch
    import torch.nn.functional as F

    import raysft.train.evaluate as ev
    import raysft.train.recipe as recipe
    from raysft.data.packing import loss_mask

    model._bench_selective = True
    original = ev.forward_loss
    if getattr(original, "_bench_dispatch", False):
        return

    def forward_loss(model: Any, batch: dict[str, Any], device: Any) -> Any:
        inner = getattr(model, "module", model)
        if not getattr(inner, "_bench_selective", False):
            return original(model, batch, device)
        keys = ("input_ids", "position_ids", "attention_mask")
        inputs = {k: batch[k].to(device) for k in keys if k in batch}
        labels, pos = batch["labels"].to(device), batch["position_ids"].to(device)
        keep = loss_mask(labels, pos)
        at = torch.zeros_like(labels, dtype=torch.bool)
        at[:, :-1] = keep  # logits at t predict target t + 1
        hook = inner.get_output_embeddings().register_forward_pre_hook(
            lambda _m, args: (args[0][at],)
        )
        try:
            logits = model(**inputs, use_cache=False).logits
        finally:
            hook.remove()
        loss = F.cross_entropy(logits.float(), labels[:, 1:][keep], reduction="sum")
        return loss, int(keep.sum())

    forward_loss._bench_dispatch = True  # type: ignore[attr-defined]
    # Both names: the recipe's training step calls the one it imported (a swap of the eval
    # module's alone timed plain raysft-full under this experiment's name).
    ev.forward_loss = recipe.forward_loss = forward_loss  # type: ignore[assignment]


FAMILIES = {"seed": run_seed, "trl": run_trl, "raysft": run_raysft}
