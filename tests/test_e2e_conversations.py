"""End to end on the embedded 135M model with conversations, as the README chains the stages:
a multi-turn `messages` file trains (every assistant turn supervised), then the tuned adapter is
evaluated on a ShareGPT file (the last assistant turn generated from its history) and packaged.
The tuned model's generations end with ChatML's turn end, <|im_end|>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llama_dataset
import llama_evaluate
import llama_package
import llama_train

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "sft_output"
CHATS = SFT / "chat_multiturn.jsonl"
SHAREGPT = SFT / "sharegpt_sample.jsonl"

pytestmark = pytest.mark.slow


def first_rows(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:n]) + "\n",
                   encoding="utf-8")
    return dst


def test_multiturn_chats_train_evaluate_on_sharegpt_and_package(tmp_path, embedded_model_dir,
                                                                 capsys):
    chats = first_rows(CHATS, tmp_path / "chats.jsonl", 64)
    sharegpt = first_rows(SHAREGPT, tmp_path / "sharegpt.jsonl", 8)
    assert llama_dataset.main(["--dataset", str(chats), "--report"]) == 0
    report = capsys.readouterr().out
    assert "assistant turns per example:" in report

    out = tmp_path / "training_output"
    assert llama_train.main([
        "--model-size", "135m", "--dataset", str(chats), "--output-dir", str(out),
        "--max-steps", "6", "--eval-steps", "6", "--logging-steps", "1", "--batch-size", "4",
        "--max-length", "384", "--val-ratio", "0.1", "--test-ratio", "0.0",
        "--num-sample-prompts", "1", "--max-new-tokens", "16"]) == 0
    run_config = json.loads((out / "final_model" / "run_config.json").read_text())
    assert run_config["stop_token_ids"] == [2]  # <|im_end|>: turn end, EOS and pad of SmolLM2
    assert run_config["label_mode"] == "all" and run_config["prompt_format"] == "chat"
    tokenization = run_config["dataset"]["tokenization"]
    assert tokenization["examples_out"] > 0 and tokenization["supervised_tokens"] > 0

    results = tmp_path / "eval.json"
    assert llama_evaluate.main([
        "--adapter-path", str(out / "final_model"), "--dataset", str(sharegpt),
        "--output", str(results), "--max-new-tokens", "64"]) == 0
    r = json.loads(results.read_text())
    by_turns = r["metrics"]["by_assistant_turns"]
    assert sum(g["n"] for g in by_turns.values()) == r["metrics"]["overall"]["n"] == 8
    samples = [json.loads(line) for line in
               Path(r["outputs"]["samples"]).read_text(encoding="utf-8").splitlines()]
    # Each prompt is the history ending with the assistant header, never the answer itself.
    for s in samples:
        assert s["prompt"].endswith("<|im_start|>assistant\n")
        assert s["reference"] not in s["prompt"].rsplit("<|im_start|>assistant\n", 1)[-1]
    ended = [s["ended_with_eos"] for s in samples]
    assert sum(ended) >= 6, f"only {sum(ended)} of 8 generations ended at <|im_end|>"
    assert r["metrics"]["overall"]["eos_rate"] == sum(ended) / len(ended)

    packages = tmp_path / "packages"
    assert llama_package.main(["--adapter-path", str(out / "final_model"),
                               "--output-dir", str(packages)]) == 0
    archive = next(packages.glob("*.tar.gz"))
    assert llama_package.main(["--verify", str(archive)]) == 0
