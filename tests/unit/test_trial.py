"""What a trial's Train worker does to its own process before the recipe runs.

Each check runs in a fresh interpreter, as a Train worker is: hiding bitsandbytes must happen
before anything imports peft, and must not leak into this test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One short trial per method given, in one process, after keep_bitsandbytes_out(first method):
# 2 steps, an eval with generation (exact match) and a checkpoint, on the embedded default.
_WORKER = """
import json, sys
from raysft.config import load_config
from raysft.search.trial import keep_bitsandbytes_out
from raysft.train.recipe import run_trial

out, methods = sys.argv[1], sys.argv[2:]
hidden = keep_bitsandbytes_out(methods[0])
report = {"hidden": hidden, "runs": {}}
for method in methods:
    cfg = load_config(
        "search_spaces/%s.yaml" % method,
        {"output_dir": out + "/" + method, "train.max_steps": 2, "train.eval_every": 2,
         "train.eval_base": False, "data.max_eval_samples": 4, "train.max_new_tokens": 4,
         "train.num_threads": 1},
    )
    final = run_trial(cfg).final
    report["runs"][method] = {"eval_loss": final["eval_loss"], "exact_match": final["exact_match"]}
bnb = sys.modules.get("bitsandbytes", "absent")
report["bitsandbytes"] = "hidden" if bnb is None else ("absent" if bnb == "absent" else "loaded")
report["peft"] = "peft" in sys.modules
print(json.dumps(report))
"""


def _worker(tmp: Path, *methods: str) -> dict:
    """The worker's report, with its stderr under "stderr"."""
    ran = subprocess.run(
        [sys.executable, "-c", _WORKER, str(tmp), *methods],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    return {**json.loads(ran.stdout.strip().splitlines()[-1]), "stderr": ran.stderr}


def _assert_no_third_party_noise(stderr: str) -> None:
    """Neither bitsandbytes' failed Hub kernel lookup (AVX512-BF16 CPUs) nor transformers'
    deprecation warning on peft's read (raysft/thirdparty.py)."""
    assert "kernels-community" not in stderr, stderr[-3000:]
    assert "is_gradient_checkpointing" not in stderr, stderr[-3000:]


def test_lora_and_full_workers_train_without_bitsandbytes(tmp_path: Path) -> None:
    report = _worker(tmp_path, "lora", "full")
    assert report["hidden"] is True
    assert report["bitsandbytes"] == "hidden" and report["peft"], report
    _assert_no_third_party_noise(report["stderr"])
    for method in ("lora", "full"):
        run = report["runs"][method]
        assert run["eval_loss"] > 0 and 0 <= run["exact_match"] <= 1, run
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_a_qlora_worker_keeps_bitsandbytes(tmp_path: Path) -> None:
    report = _worker(tmp_path, "qlora")
    assert report["hidden"] is False
    assert report["bitsandbytes"] == "loaded", report
    _assert_no_third_party_noise(report["stderr"])
    assert report["runs"]["qlora"]["eval_loss"] > 0


def test_one_worker_trials_get_the_torch_free_backend_and_data_parallel_ones_rays() -> None:
    from ray.train.torch.config import TorchConfig

    from raysft.search.backend import OneWorkerTorchConfig
    from raysft.search.trial import backend_config

    assert isinstance(backend_config(1), OneWorkerTorchConfig)
    multi = backend_config(2)  # a process group: gloo, or nccl when the workers have GPUs
    assert isinstance(multi, TorchConfig) and multi.backend is None


def test_a_resumed_runs_first_report_names_the_restored_checkpoint() -> None:
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from raysft.search import results
    from raysft.search.trial import name_restored_checkpoint

    assert results.CHECKPOINT_PATH_KEY == CHECKPOINT_PATH_KEY  # raysft's copy of Ray's key
    restored = ["/exp/train/train-t/checkpoint_a"]
    # The replayed record of a run resumed at max_steps: nothing else will name a checkpoint.
    replay = {"step": 20, "eval_loss": 0.3}
    named = name_restored_checkpoint(replay, has_checkpoint=False, restored=restored)
    assert named == {**replay, "checkpoint_path": "/exp/train/train-t/checkpoint_a"}
    assert restored == [] and replay == {"step": 20, "eval_loss": 0.3}
    # Later reports, and a first report that carries its own checkpoint, are left as they are.
    later = {"step": 24, "eval_loss": 0.2}
    assert name_restored_checkpoint(later, has_checkpoint=False, restored=restored) is later
    own = ["/exp/old"]
    assert name_restored_checkpoint(later, has_checkpoint=True, restored=own) is later
    assert own == []


def test_outside_a_tune_session_no_trial_is_running() -> None:
    """The real check (tests of the retry loop replace it): Ray still has the function it
    imports, and it answers False outside a trial, where a Ray that moved it would say True."""
    from raysft.search.trial import tune_is_running_this_trial

    assert tune_is_running_this_trial() is False


def test_a_worker_with_an_8bit_optimizer_keeps_bitsandbytes() -> None:
    """bitsandbytes' 8-bit AdamW needs the module a LoRA or full worker otherwise hides."""
    from raysft.search.trial import keep_bitsandbytes_out

    before = sys.modules.get("bitsandbytes", "absent")
    for optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        assert keep_bitsandbytes_out("lora", optimizer) is False
        assert keep_bitsandbytes_out("full", optimizer) is False
    assert sys.modules.get("bitsandbytes", "absent") is before
