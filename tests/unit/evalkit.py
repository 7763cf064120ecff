"""Helpers for the evaluation tests (imported by test_templates and test_evaluate_cli).

- ``chat_tokenizer_dir``: a local tokenizer directory carrying a real model family's chat template
  (Llama-3, Gemma, Phi-3) over the embedded byte-level vocabulary plus that family's special
  tokens; no network.
- ``chain_model_dir``: a real one-layer Llama whose weights make its next token a function of the
  current token only, so its greedy answer and its loss are known by hand.
- ``moved_lora_dir``: a LoRA adapter on the embedded base that changes it (B off zero), saved as
  a trial saves one.
- ``LONG_HISTORY``: a held-out conversation whose prompt before its last answer fills
  ``data.max_seq_len: 96`` (embedded tokenizer), so generation leaves it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LONG_HISTORY = [
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "Now repeat: " + "word " * 60},
    {"role": "assistant", "content": "no"},
]

# The chat templates as the model repos ship them (tokenizer_config.json "chat_template").
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Qwen3's (tokenizer_config.json), less its tools branch: the last answer after the last user
# turn opens with a reasoning block, empty when the message has none.
QWEN3_TEMPLATE = (
    Path(__file__).resolve().parents[1] / "golden" / "chat_templates" / "qwen3.jinja"
).read_text(encoding="utf-8")

# family -> (chat template, bos, eos, other special tokens, the turn terminator)
FAMILIES: dict[str, tuple[str, str, str, tuple[str, ...], str]] = {
    "llama3": (
        LLAMA3_TEMPLATE,
        "<|begin_of_text|>",
        "<|end_of_text|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
    ),
    "gemma": (
        GEMMA_TEMPLATE,
        "<bos>",
        "<eos>",
        ("<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>",
    ),
    "phi3": (
        PHI3_TEMPLATE,
        "<s>",
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|end|>",
    ),
}


def chat_tokenizer_dir(root: Path, family: str) -> Path:
    """Save a byte-level tokenizer with ``family``'s special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from raysft.assets.tokenizer import bytes_to_unicode

    template, bos, eos, extra, _ = FAMILIES[family]
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = [bos, eos, "<pad>", "<unk>", *extra]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=list(extra),
        clean_up_tokenization_spaces=False,
        chat_template=template,
    )
    out = root / f"tok-{family}"
    fast.save_pretrained(out)
    return out


def token_id(tokenizer: Any, text: str) -> int:
    """The one token of ``text`` (a special token or one byte)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


def chain_model_dir(root: Path, tokenizer: Any, chain: dict[str, str], *, default: str) -> Path:
    """A Llama whose greedy next token after token ``a`` is ``chain[a]`` (else ``default``).

    One layer with its attention and MLP outputs zeroed leaves the residual stream equal to the
    embedding; the embedding is one-hot, so after the final RMSNorm the hidden state is
    ``s * e_a`` with ``s = (1/H + eps) ** -0.5``, and the LM head maps ``e_a`` to its successor:
    the logits are ``s`` for the successor and 0 for every other token (``chain_logit``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    hidden = -(-vocab // 8) * 8  # >= vocab; 4 heads of an even size
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    succ = {token_id(tokenizer, a): token_id(tokenizer, b) for a, b in chain.items()}
    fallback = token_id(tokenizer, default)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for a in range(vocab):
            model.lm_head.weight[succ.get(a, fallback), a] = 1.0
    out = root / "chain-model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def chain_logit(tokenizer: Any) -> float:
    """The successor's logit ``s`` in ``chain_model_dir``'s model."""
    hidden = -(-len(tokenizer) // 8) * 8
    return float((1 / hidden + 1e-6) ** -0.5)


def moved_lora_dir(out: Path) -> Path:
    """A LoRA adapter on the embedded base with B off zero (so it changes the base's losses and
    answers), saved as a trial saves one: adapter, tokenizer, generation config."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from raysft.assets import resolve
    from raysft.config import LoraSection, ModelSection
    from raysft.train.lora import build_lora_config
    from raysft.train.model import load_tokenizer
    from raysft.train.saving import save_model

    base = AutoModelForCausalLM.from_pretrained(resolve("embedded:tiny-base"))
    model = get_peft_model(base, build_lora_config(LoraSection()))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return save_model(model, load_tokenizer(ModelSection()), out, method="lora")
