"""``python -m raysft.merge``: an adapter merged into its base, saved as a plain model that gives
the adapter's logits; bad inputs one message, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from raysft.assets import resolve
from raysft.errors import ModelError
from raysft.merge import merge

BASE = "embedded:tiny-base"
TEXT = "Count the letters in the word dru."


def _adapter(
    tmp_path: Path, method: str = "lora", *, base_dir: str = BASE, **model_section: Any
) -> Path:
    """An adapter on the embedded base (or ``base_dir``) whose update is not zero (B is random),
    saved as a run saves one: its base named portably, its tokenizer and config.yaml (its
    ``model`` section: ``model``) beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve(base_dir))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, lora)
    out = tmp_path / f"adapter-{method}"
    model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": base_dir}))
    AutoTokenizer.from_pretrained(resolve(BASE)).save_pretrained(out)
    settings = {"name_or_path": base_dir, **model_section}
    config = {"model": settings, "method": method, "train": {"device": "cpu"}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return out


def _logits(model: Any, tok: Any) -> torch.Tensor:
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_merged_adapter_is_a_plain_model_with_the_adapters_logits(
    tmp_path: Path, method: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _adapter(tmp_path, method)
    out = tmp_path / "merged"
    merge(str(adapter), out)
    # Plain transformers, no peft: the weights hold the update.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert not (out / "adapter_config.json").exists()
    # A QLoRA adapter goes onto the unquantized base, as load_champion applies it.
    base = AutoModelForCausalLM.from_pretrained(resolve(BASE)).eval()
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    want = _logits(with_adapter, tok)
    torch.testing.assert_close(_logits(model, tok), want, atol=1e-4, rtol=1e-4)
    plain = _logits(AutoModelForCausalLM.from_pretrained(resolve(BASE)).eval(), tok)
    assert (plain - want).abs().max() > 1e-2  # the update changes the logits: checked for real
    assert json.loads((out / "merged.json").read_text())["base"] == BASE
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []
    # Readable by whoever serves it, as a plain write under this umask makes its files.
    plain_mode = 0o666 & ~_umask()
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {
        f.name: plain_mode for f in out.iterdir()
    }


@pytest.mark.parametrize(
    ("run_dtype", "asked", "saved"),
    [
        ("float32", "bfloat16", torch.bfloat16),
        ("bfloat16", "auto", torch.bfloat16),  # a GPU run's LoRA base: as the run loaded it
        ("bfloat16", "float32", torch.float32),
        ("float16", "auto", torch.float16),
    ],
)
def test_a_merge_is_checked_in_float32_and_saved_in_the_dtype_asked(
    tmp_path: Path, run_dtype: str, asked: str, saved: torch.dtype
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    # A merge killed half way left its staging folder: the next one sweeps it away.
    stale = tmp_path / ".merged.merging-0c925310"
    stale.mkdir()
    merge(str(_adapter(tmp_path, dtype=run_dtype)), out, dtype=asked)
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == saved
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_a_merge_whose_saved_model_computes_no_finite_logits_is_refused(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    # A base whose activations overflow float16 (finite in float32, where the merge is made).
    base = AutoModelForCausalLM.from_pretrained(resolve(BASE))
    with torch.no_grad():
        for layer in base.model.layers[:1]:
            layer.self_attn.o_proj.weight.mul_(3e5)
            layer.mlp.down_proj.weight.mul_(3e5)
    loud = tmp_path / "loud-base"
    base.save_pretrained(loud)
    adapter = _adapter(tmp_path, base_dir=str(loud))
    out = tmp_path / "merged"
    with pytest.raises(ModelError, match=r"the saved model's logits \(in float16\) are not finite"):
        merge(str(adapter), out, dtype="float16")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_logits_off_by_more_than_the_tolerance_or_not_finite_are_refused() -> None:
    from raysft.merge import _compare

    want = torch.tensor([[10.0, -20.0]])
    _compare(want + 1e-4, want, rtol=1e-4, what="x")  # 1e-4 of 20: within
    with pytest.raises(ModelError, match=r"x differ from the adapter's by 0.01 \(at most 0.002"):
        _compare(want + 1e-2, want, rtol=1e-4, what="x")
    with pytest.raises(ModelError, match="x are not finite"):
        _compare(torch.tensor([[float("nan"), 0.0]]), want, rtol=1e-4, what="x")


def test_what_cannot_be_merged_is_one_message_and_nothing_is_written(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match=f"{taken}: not empty; give a new or empty directory"):
        merge(str(adapter), taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    full = Path(resolve(BASE))
    with pytest.raises(ModelError, match="a full model, not an adapter: nothing to merge"):
        merge(str(full), tmp_path / "out")
    with pytest.raises(ModelError, match="no such directory"):
        merge(str(tmp_path / "absent"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(ModelError, match=f"{a_file}: a file, not a directory to write x into"):
        merge(str(adapter), a_file / "x")
    assert a_file.read_text() == "mine"
    # Into the adapter's own directory: it would hold a copy of what it reads, for good.
    before = sorted(p.name for p in adapter.iterdir())
    with pytest.raises(ModelError) as err:
        merge(str(adapter), adapter / "merged")
    assert str(err.value) == (
        f"{adapter / 'merged'}: inside {adapter}, the adapter merged; give a directory outside it"
    )
    assert sorted(p.name for p in adapter.iterdir()) == before
    # Its generation_config.json broken: named, not transformers' traceback.
    (adapter / "generation_config.json").write_text('{"eos_token_id": [')
    with pytest.raises(ModelError) as err:
        merge(str(adapter), tmp_path / "out")
    assert str(err.value).startswith(
        f"{adapter / 'generation_config.json'}: not a generation config transformers can read ("
    )
    assert not (tmp_path / "out").exists()
    # Its adapter_config.json not text at all: said as broken JSON is.
    (adapter / "generation_config.json").unlink()
    (adapter / "adapter_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ModelError, match=f"{adapter}/adapter_config.json: not valid JSON: 'utf-8'"):
        merge(str(adapter), tmp_path / "out")


def test_the_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "raysft.merge", str(tmp_path / "absent"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.strip().splitlines() == [f"error: {tmp_path / 'absent'}: no such directory"]


@pytest.mark.parametrize(
    ("record", "saved"),
    [
        ({"numerics": {"base_dtype": "bfloat16"}}, torch.bfloat16),  # a champion export's
        # A QLoRA run's 4-bit base: the dtype its matmuls computed in.
        ({"final": {"numerics": {"base_dtype": "uint8", "compute_dtype": "float16"}}},
         torch.float16),
    ],
)  # fmt: skip
def test_auto_reads_an_exports_record_and_a_qlora_runs_compute_dtype(
    tmp_path: Path, record: dict[str, Any], saved: torch.dtype
) -> None:
    from transformers import AutoModelForCausalLM

    adapter = _adapter(tmp_path)
    (adapter / "metrics.json").write_text(json.dumps(record))
    merge(str(adapter), tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto").dtype == saved


def test_a_champion_export_records_the_dtypes_of_its_checkpoints_run(tmp_path: Path) -> None:
    from raysft.search.export import recorded_numerics as _numerics

    numerics = {"base_dtype": "bfloat16", "autocast": "bfloat16"}
    state = {"progress": {"step": 3, "final": {"numerics": numerics}}}
    torch.save(state, tmp_path / "training_state.pt")
    assert _numerics(str(tmp_path)) == numerics
    (tmp_path / "training_state.pt").write_bytes(b"not a state")
    assert _numerics(str(tmp_path)) is None  # said nowhere: merge then warns of its guess


def test_auto_saves_the_dtype_the_run_recorded_not_the_merging_machines(tmp_path: Path) -> None:
    """A GPU run loaded its base in bf16 (``model.dtype: auto``) and trained on ``cuda``: merged
    on this CPU machine, it is saved in bf16, as its run recorded, not in the float32 that
    ``auto`` resolves to here."""
    from transformers import AutoModelForCausalLM

    adapter = _adapter(tmp_path)
    config = yaml.safe_load((adapter / "config.yaml").read_text())
    config["train"]["device"] = "cuda"  # the run's: the merge runs on --device (cpu)
    (adapter / "config.yaml").write_text(yaml.safe_dump(config))
    final = {"numerics": {"base_dtype": "bfloat16", "autocast": "bfloat16"}}
    (adapter / "metrics.json").write_text(json.dumps({"final": final, "history": []}))
    merge(str(adapter), tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto").dtype == (
        torch.bfloat16
    )


def test_an_out_that_links_to_an_empty_folder_is_written_there(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    merge(str(_adapter(tmp_path)), link)
    assert (target / "merged.json").is_file() and link.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if ".merging-" in p.name] == []


def test_a_full_model_is_refused_before_any_warning_of_missing_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ModelError, match="a full model, not an adapter: nothing to merge"):
        merge(resolve(BASE), tmp_path / "out")
    assert caplog.records == []


def test_a_merge_sweeps_only_its_own_outs_stale_staging_folders(tmp_path: Path) -> None:
    other = tmp_path / ".m1.merging-0c925310"  # another OUT's, which m[12] would match as a glob
    other.mkdir()
    merge(str(_adapter(tmp_path)), tmp_path / "m[12]")
    assert other.is_dir() and (tmp_path / "m[12]" / "merged.json").is_file()


def test_a_merge_running_beside_keeps_its_staging_folder_and_the_later_rename_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import raysft.merge as merge_module

    running = subprocess.Popen(["sleep", "60"])
    ended = subprocess.Popen(["true"])
    ended.wait()
    try:
        live = tmp_path / f".merged.merging-{running.pid}-0c925310"
        dead = tmp_path / f".merged.merging-{ended.pid}-0c925311"
        live.mkdir()
        dead.mkdir()
        adapter = _adapter(tmp_path)
        checked = merge_module._check_saved

        def another_merge_finishes_first(*args: Any, **kwargs: Any) -> None:
            checked(*args, **kwargs)
            (tmp_path / "merged").mkdir(exist_ok=True)
            (tmp_path / "merged" / "merged.json").write_text("{}")  # its rename came first

        monkeypatch.setattr(merge_module, "_check_saved", another_merge_finishes_first)
        with pytest.raises(ModelError, match=r"merged: not empty; .* \(written meanwhile\); "):
            merge(str(adapter), tmp_path / "merged")
        assert live.is_dir() and not dead.exists()
        assert (tmp_path / "merged" / "merged.json").read_text() == "{}"  # the other's, kept
        staged = [p for p in tmp_path.iterdir() if ".merging-" in p.name]
        assert staged == [live]  # this merge's own staging folder is gone
    finally:
        running.kill()
        running.wait()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_merge_asked_for_cuda_where_there_is_none_says_to_use_the_cpu(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        merge(str(_adapter(tmp_path)), tmp_path / "merged", device="cuda")
    assert str(err.value) == "--device cuda: torch sees no CUDA GPU here; merge with --device cpu"
    assert not (tmp_path / "merged").exists()
