"""The schema objects of the files one stage writes and another reads (llama_sft/layout.py),
and the one function coupled to transformers' private checkpoint code."""

from __future__ import annotations

import hashlib
import inspect
import json

import pytest

from llama_sft.config import TrainArgs
from llama_sft.files import MANIFEST, verify_manifest, write_manifest
from llama_sft.layout import FORMAT_VERSION, ResumeState, RunConfig, SchemaError
from llama_sft.training import checkpoints


def test_run_config_round_trips_and_records_its_format_version(tmp_path):
    cfg = TrainArgs(model_size="135m", lora_r=8, use_4bit=True)
    rc = RunConfig.from_train_args(cfg, stage="train", base_model="smollm2-135m",
                                   prompt_format="chat", dataset_info={"dataset_hash": "abc"},
                                   toolkit_version="0.1.0", library_versions={"torch": "x"})
    rc.to_json(tmp_path / "run_config.json")
    data = json.loads((tmp_path / "run_config.json").read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert data["quantization"] == "4bit" and data["lora"]["r"] == 8
    assert set(data["training"]) == {"batch_size", "gradient_accumulation_steps",
                                     "learning_rate", "num_epochs", "max_steps", "warmup_ratio",
                                     "weight_decay", "lr_scheduler", "eval_steps",
                                     "early_stopping_patience", "gradient_checkpointing", "seed"}
    assert RunConfig.from_json(tmp_path / "run_config.json") == rc


def test_run_config_reads_a_file_from_before_format_versions(tmp_path):
    """run_config.json files written by 0.1.0 before the restructure have no format_version."""
    (tmp_path / "run_config.json").write_text(json.dumps(
        {"base_model": "smollm2-135m", "model_size": "135m", "prompt_format": "chat",
         "max_length": 512, "quantization": None, "some_future_key": 1}))
    rc = RunConfig.from_json(tmp_path / "run_config.json")
    assert (rc.base_model, rc.max_length, rc.format_version) == ("smollm2-135m", 512, 1)


@pytest.mark.parametrize("text, reason", [("{", "not valid JSON"), ("[1]", "not a JSON object"),
                                          ('{"format_version": 99}', "newer toolkit")])
def test_a_broken_or_newer_file_is_refused_with_the_reason(tmp_path, text, reason):
    path = tmp_path / "run_config.json"
    path.write_text(text)
    with pytest.raises(SchemaError, match=reason):
        RunConfig.from_json(path)
    with pytest.raises(SchemaError, match=reason):
        ResumeState.from_json(path)


def test_manifest_is_versioned_and_detects_a_changed_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    write_manifest(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text())["format_version"] == 1
    assert verify_manifest(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"abd")
    assert "a.bin does not match" in verify_manifest(tmp_path)


def test_write_trainer_files_still_matches_upstreams_save_checkpoint():
    """checkpoints.write_trainer_files re-implements transformers' private
    Trainer._save_checkpoint (to write into a staging folder). When upstream changes that
    method, this fails: compare the new source with write_trainer_files, update it, then the
    pinned hash and version."""
    import transformers
    from transformers import Trainer

    source = inspect.getsource(Trainer._save_checkpoint)
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == checkpoints.UPSTREAM_SAVE_CHECKPOINT_SHA256, (
        f"transformers {transformers.__version__} changed Trainer._save_checkpoint (written "
        f"against {checkpoints.UPSTREAM_VERSION}); review training/checkpoints.py")
    for name in ("store_flos", "save_model", "_save_optimizer_and_scheduler", "_save_scaler",
                 "_save_rng_state", "_get_output_dir", "_push_from_checkpoint"):
        assert callable(getattr(Trainer, name, None)), name
