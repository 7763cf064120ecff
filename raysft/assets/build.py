"""Build the embedded default assets of raysft: ``python -m raysft.assets.build [--out DIR]``.

What is built (all deterministic, single process, CPU only, a few minutes on 2 cores):

* ``tiny-base/``: a tiny Llama causal LM (~0.9M parameters) with a byte-level tokenizer
  (256 byte tokens + ``<s> </s> <pad> <unk> <|im_start|> <|im_end|>``, ChatML chat template),
  pretrained from scratch with plain next-token loss on generated English-like prose.
* ``tasks-alpaca.jsonl`` / ``tasks-sharegpt.jsonl``: instruction data for SFT.
* ``tasks-eval.jsonl``: held-out instructions (Alpaca format) with exact-match answers.
* ``tasks-text.jsonl`` / ``tasks-text-eval.jsonl``: a free-text task (one-sentence answers about
  a word) for ROUGE-L and BLEU.
* ``tasks-code.jsonl`` / ``tasks-code-eval.jsonl``: a code task (one line of Python setting ``x``
  to a fact about a word; rows carry ``tests``) for pass@k.

``--data-only`` rewrites the datasets and leaves the pretrained model as it is (adding SFT or
eval rows never needs a new base).

Why: raysft needs an offline, fast-to-train stand-in for "a pretrained base model + an
instruction dataset" so that searches, tests and demos show a real SFT effect. Following LIMA,
the skills (upper-casing, repeating a word, counting letters, first and last letter) come from
the pretraining prose, which states the facts in sentences such as "In capital letters, hello
is HELLO." and never uses chat markup. The base therefore continues text but does not answer
ChatML prompts (exact match ~0); a short LoRA SFT run only has to teach the chat format and
lifts held-out exact match by tens of points. Eval words never appear in the SFT data but do
appear in the prose. (Reversing words and adding numbers were tried too: a model this small
either does not learn them in the pretraining budget or does not carry them over to the chat
format, so they are left out.)

The weights are committed, so rebuilding is only needed after changing this file, the corpus or
the tokenizer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from raysft.assets import corpus, text_code
from raysft.assets.tokenizer import MODEL_MAX_LENGTH, build_tokenizer

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent
MODEL_DIR_NAME = "tiny-base"
SEED = 0

MODEL_KWARGS = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "tie_word_embeddings": True,
}
PRETRAIN = {
    "steps": 1500,
    "batch_size": 16,
    "seq_len": 128,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup": 50,
    "weight_decay": 0.01,
}


def token_stream(tokenizer, documents: Iterator[str]) -> Iterator[int]:
    """Token ids of the prose documents, each one closed by ``</s>``."""
    for document in documents:
        yield from tokenizer.encode(document, add_special_tokens=False)
        yield tokenizer.eos_token_id


def make_model(tokenizer, **overrides) -> LlamaForCausalLM:
    """Freshly initialised tiny Llama sized for ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**MODEL_KWARGS, **overrides},
    )
    return LlamaForCausalLM(config)


def pretrain(model: LlamaForCausalLM, tokenizer, **overrides) -> list[float]:
    """Plain next-token pretraining on a fresh (never repeated) prose stream."""
    hp = {**PRETRAIN, **overrides}
    steps, bs, seq_len = hp["steps"], hp["batch_size"], hp["seq_len"]
    stream = token_stream(tokenizer, corpus.pretraining_documents())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay}],
        lr=hp["lr"],
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )

    def lr_factor(step: int) -> float:
        if step < hp["warmup"]:
            return (step + 1) / hp["warmup"]
        progress = (step - hp["warmup"]) / max(1, steps - hp["warmup"])
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return hp["min_lr_ratio"] + (1 - hp["min_lr_ratio"]) * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # Special tokens other than </s> never occur in the prose. Left alone, Adam would push their
    # (tied) embedding rows far away from every hidden state (the "untrained token" problem of
    # real base models), and SFT with LoRA could then barely learn to emit <|im_end|>. Freezing
    # those rows keeps them near their small random init, like tokens added just before SFT.
    unseen = torch.tensor(
        [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id], dtype=torch.long
    )
    embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
    for weight in {id(m.weight): m.weight for m in embeddings}.values():  # one if tied
        cast(torch.Tensor, weight).register_hook(lambda grad: grad.index_fill(0, unseen, 0.0))
    model.train()
    losses = []
    start = time.monotonic()
    for step in range(steps):
        ids = torch.tensor(list(itertools.islice(stream, bs * seq_len))).view(bs, seq_len)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            logger.info(
                "step %d/%d loss %.4f (%.0fs)", step, steps, loss.item(), time.monotonic() - start
            )
    model.eval()
    return losses


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept readable."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def datasets() -> dict[str, list[dict]]:
    """Every shipped dataset: file name -> rows."""
    return {
        "tasks-alpaca.jsonl": corpus.alpaca_rows(),
        "tasks-sharegpt.jsonl": corpus.sharegpt_rows(),
        "tasks-eval.jsonl": corpus.eval_rows(),
        "tasks-text.jsonl": text_code.text_rows(),
        "tasks-text-eval.jsonl": text_code.text_rows(60, held_out=True),
        "tasks-code.jsonl": text_code.code_rows(),
        "tasks-code-eval.jsonl": text_code.code_rows(50, held_out=True),
    }


def write_datasets(out: Path = ASSETS_DIR) -> None:
    """Write the datasets into ``out`` (no model: seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in datasets().items():
        write_jsonl(out / name, rows)


def build(out: Path = ASSETS_DIR) -> None:
    """Build the datasets and the pretrained tiny base into ``out``."""
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    write_datasets(out)

    tokenizer = build_tokenizer()
    model = make_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("pretraining %d parameters", n_params)
    pretrain(model, tokenizer)

    model_dir = out / MODEL_DIR_NAME
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        # Stop on either end marker so chat-tuned copies stop after their answer.
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    logger.info("wrote %s", model_dir)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="output directory")
    parser.add_argument(
        "--data-only", action="store_true", help="rewrite the datasets, keep the base model"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.monotonic()
    (write_datasets if args.data_only else build)(args.out)
    print(f"built assets in {args.out} in {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
