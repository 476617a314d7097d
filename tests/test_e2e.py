"""End to end on the embedded 135M model, chained the way a user runs the stages:
dataset report -> pilot / train -> evaluate -> package -> verify."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest

import llama_dataset
import llama_evaluate
import llama_package
import llama_pilot
import llama_train

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "sft_output"
CANARIES = {"WANDB_API_KEY": "wandb-canary-0123456789abcdef0123456789abcdef01234567",
            "HF_TOKEN": "hf_canaryTOKENabcdefghijklmnopqrstuv",
            "HUGGING_FACE_HUB_TOKEN": "hf_canaryHUBTOKENabcdefghijklmnopqr"}

pytestmark = pytest.mark.slow


def subset(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:n]) + "\n",
                   encoding="utf-8")
    return dst


def assert_no_canary(paths) -> None:
    for p in paths:
        data = p.read_bytes()
        for name, value in CANARIES.items():
            assert value.encode() not in data, f"{name} leaked into {p}"


def test_pilot_writes_every_field_with_sane_values(tmp_path, embedded_model_dir, capsys):
    out = tmp_path / "pilot"
    code = llama_pilot.main(["--golden-set", str(SFT / "golden_set.jsonl"), "--output-dir", str(out),
                             "--max-steps", "30", "--eval-steps", "15", "--holdout-ratio", "0.1",
                             "--max-new-tokens", "48"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Pilot: smollm2-135m" in printed and ("GO" in printed)
    r = json.loads((out / "pilot_evaluation.json").read_text())
    assert r["model"]["base_model"] == "smollm2-135m"
    assert "embedded" in r["model"]["why"] and r["model"]["quantization"] == "4bit"
    t = r["training"]
    assert t["steps"] == 30 and t["train_seconds"] > 0 and t["tokens_per_second"] > 0
    assert t["peak_memory_mb"] > 100
    assert math.isfinite(t["loss_start"]) and math.isfinite(t["loss_end"])
    for phase in ("eval_before", "eval_after"):
        assert math.isfinite(r[phase]["loss"]) and r[phase]["perplexity"] >= 1
        assert r[phase]["metrics"]["overall"]["n"] == r["task_metric"]["held_out_examples"]
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"]  # 30 steps already help
    tm = r["task_metric"]
    assert 0 <= tm["before"] <= 1 and 0 <= tm["after"] <= 1 and tm["held_out_examples"] >= 10
    assert r["samples"] and {"prompt", "reference", "base_output", "tuned_output"} <= set(r["samples"][0])
    p = r["projection"]
    assert p["available"] and p["projected_seconds"] > 0 and p["train_examples"] > 2000
    assert set(r["checks"]) == {"loss_decreased", "no_nan", "generations_end_with_eos",
                                "tuned_beats_base"}
    assert all(isinstance(c["passed"], bool) and c["reason"] for c in r["checks"].values())
    assert r["go"] == all(c["passed"] for c in r["checks"].values())
    assert (out / "final_model" / "adapter_model.safetensors").is_file()


def test_guarantee_15_no_secret_leaves_a_pilot_train_evaluate_package_run(
        tmp_path, embedded_model_dir, monkeypatch, capsys):
    """RELIABILITY item 15, and the guide's workflow on the CPU: with WANDB_API_KEY, HF_TOKEN
    and HUGGING_FACE_HUB_TOKEN set to canary strings, a full dataset report -> pilot -> train
    (with W&B, offline) -> evaluate -> package -> verify run writes none of them into any file
    (logs, JSON, W&B run files, model card, archive members) nor prints them; the packaged
    adapter verifies."""
    for k, v in CANARIES.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data = subset(SFT / "sft_dataset.jsonl", tmp_path / "sft_dataset.jsonl", 120)
    golden = subset(SFT / "golden_set.jsonl", tmp_path / "golden_set.jsonl", 12)
    printed = []

    assert llama_pilot.main(["--golden-set", str(golden), "--dataset", str(data), "--output-dir",
                             "pilot_output", "--model-size", "135m", "--no-use-4bit",
                             "--max-steps", "2", "--eval-steps", "2", "--holdout-ratio", "0.3",
                             "--max-new-tokens", "8", "--use-wandb"]) == 0
    assert Path("pilot_output/pilot_evaluation.json").is_file()
    printed.append(capsys.readouterr())

    assert llama_dataset.main(["--dataset", str(data), "--golden-set", str(golden), "--report",
                               "--output", "report.json"]) == 0
    assert json.loads(Path("report.json").read_text())["examples"] == 120

    assert llama_train.main(["--model-size", "135m", "--dataset", str(data), "--golden-set",
                             str(golden), "--output-dir", "training_output", "--config",
                             str(SFT / "training_config.json"), "--max-steps", "6",
                             "--eval-steps", "3", "--save-steps", "3", "--use-wandb"]) == 0
    final = Path("training_output/final_model")
    assert llama_evaluate.main(["--adapter-path", str(final), "--dataset", str(golden),
                                "--output", "evaluation_results.json", "--num-samples", "6",
                                "--max-new-tokens", "32"]) == 0
    results = json.loads(Path("evaluation_results.json").read_text())
    assert results["metrics"]["overall"]["n"] == 6

    assert llama_package.main(["--adapter-path", str(final), "--output-dir", "packages",
                               "--eval-results", "evaluation_results.json"]) == 0
    archives = list(Path("packages").glob("*.tar.gz"))
    assert len(archives) == 1
    printed.append(capsys.readouterr())
    assert llama_package.main(["--verify", str(archives[0])]) == 0
    printed.append(capsys.readouterr())

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in written)  # the W&B runs are among the files checked
    assert_no_canary(written)
    for out in printed:
        for name, value in CANARIES.items():
            assert value not in out.out + out.err, f"{name} was printed"
    with tarfile.open(archives[0]) as tar:
        for m in tar.getmembers():
            if m.isfile():
                data_bytes = tar.extractfile(m).read()
                for name, value in CANARIES.items():
                    assert value.encode() not in data_bytes, f"{name} leaked into {m.name}"
