"""A model that does not keep packed samples apart is refused before it trains on packed rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from raysft.errors import ConfigError
from raysft.train.packing_check import check_packing, packed_leak

_SMALL = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
KEPT_APART = {
    "llama": _SMALL,
    "mistral": _SMALL,
    "qwen2": _SMALL,
    "gemma": {**_SMALL, "head_dim": 8},
    "phi3": _SMALL,
    "gpt2": {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
}
# Their attention mask is built without position_ids (transformers 5): packed samples leak.
LEAKING = {
    "opt": {
        "vocab_size": 128, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 64, "word_embed_proj_dim": 32,
    },
    "bloom": {"vocab_size": 128, "hidden_size": 32, "n_layer": 2, "n_head": 4},
    "mpt": {"vocab_size": 128, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
}  # fmt: skip


def _model(arch: str, options: dict[str, Any], dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **options)
    return AutoModelForCausalLM.from_config(cfg).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", sorted(KEPT_APART))
def test_models_that_keep_packed_samples_apart_pass(arch: str, dtype: torch.dtype) -> None:
    model = _model(arch, KEPT_APART[arch], dtype).train()
    leak, logits_dtype = packed_leak(model, vocab_size=128, device="cpu")
    assert leak < 1e-6 and logits_dtype == dtype  # 0 here: the same sums in both rows
    check_packing(model, name=arch, vocab_size=128, device="cpu")
    assert model.training  # put back as it was


def test_a_mixture_of_experts_rounding_is_not_a_leak() -> None:
    """Mixtral's experts sum a token's outputs in an order that depends on the batch: its
    packed samples may differ by rounding (3e-7 of the largest logit in fp32 here), not a leak."""
    model = _model("mixtral", {**_SMALL, "num_local_experts": 8, "num_experts_per_tok": 2})
    leak, _ = packed_leak(model, vocab_size=128, device="cpu")
    assert leak < 1e-5  # 0 on some CPUs, where the sums happen to round alike
    check_packing(model, name="mixtral", vocab_size=128, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", sorted(LEAKING))
def test_models_whose_packed_samples_see_each_other_are_refused(
    arch: str, dtype: torch.dtype
) -> None:
    model = _model(arch, LEAKING[arch], dtype)
    assert packed_leak(model, vocab_size=128, device="cpu")[0] > 1e-3
    with pytest.raises(ConfigError) as err:
        check_packing(model, name=f"/models/{arch}", vocab_size=128, device="cpu")
    message = str(err.value)
    assert message.startswith(f"data.packing: /models/{arch} ({type(model).__name__}) does not")
    assert "set data.packing: false" in message


def test_a_run_on_such_a_model_is_refused_before_it_trains_and_trains_unpacked(
    tmp_path: Path,
) -> None:
    """Through the recipe: an OPT model with data.packing is one message; unpacked, it trains."""
    from raysft.assets.tokenizer import build_tokenizer
    from raysft.train.recipe import run_trial
    from tests.unit.test_recipe import _config

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "opt", vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model_dir = tmp_path / "opt"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    options = {"train.eval_base": False, "train.exact_match": False}
    with pytest.raises(ConfigError, match=r"^data\.packing: .*OPTForCausalLM\) does not keep"):
        run_trial(_config(tmp_path, model_dir, "full", **options))
    assert not (tmp_path / "out-full").exists() or not any((tmp_path / "out-full").iterdir())
    result = run_trial(_config(tmp_path, model_dir, "full", **options, **{"data.packing": False}))
    assert len(result.history) == 4
