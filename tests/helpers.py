"""Plain helpers shared by several test modules: small data files cut from the sample data, the
tiny-model training command line, and readers for what a run writes.

Test modules import these from here (`from helpers import tiny_args`), never from each other."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "sft_output"
GOLDEN = SFT / "golden_set.jsonl"


def small_dataset(tmp_path: Path, n: int = 48) -> Path:
    """The first n rows of the sample data: short, real examples."""
    lines = (SFT / "sft_dataset.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def small_golden(tmp_path: Path, n: int = 8) -> Path:
    lines = (SFT / "golden_set.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / "golden.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_args(tmp_path, tiny_llama_dir, out="run", *extra) -> list[str]:
    return ["--base-model", str(tiny_llama_dir), "--model-size", "135m",
            "--dataset", str(small_dataset(tmp_path)), "--golden-set", str(small_golden(tmp_path)),
            "--output-dir", str(tmp_path / out), "--max-length", "256", "--batch-size", "4",
            "--gradient-accumulation-steps", "1", "--learning-rate", "5e-3", "--logging-steps", "1",
            "--val-ratio", "0.1", "--test-ratio", "0.1", "--num-sample-prompts", "2",
            "--max-new-tokens", "8", "--seed", "7", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def adapter_tensors(folder: Path):
    """The adapter's tensors by name (a dict of torch.Tensor)."""
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def make_adapter(base_dir: str | Path, out_dir: Path, *, lora_b_std: float, seed: int = 1,
                 base_model: str | None = None, model_size: str = "135m",
                 quantization: str | None = None, run_config_extra: dict | None = None) -> Path:
    """A final_model/ folder as llama_train.py writes it: a LoRA adapter whose B matrices are
    random (so it changes the outputs), the tokenizer, and run_config.json."""
    import torch

    from llama_sft.modeling.load import add_lora, load_model, load_tokenizer

    model = load_model(str(base_dir), dtype=torch.float32)
    tokenizer = load_tokenizer(str(base_dir))
    model = add_lora(model, r=8, alpha=16, dropout=0.0)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, lora_b_std)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    run_config = {
        "stage": "train", "base_model": base_model or str(base_dir), "model_size": model_size,
        "prompt_format": "chat", "max_length": 256, "quantization": quantization,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "num_epochs": 3.0, "max_steps": 10, "lr_scheduler": "cosine", "seed": 42},
        "dataset": {"path": "sft_dataset.jsonl", "file_sha256": "ab" * 32,
                    "dataset_hash": "0123456789abcdef"},
        "trust_remote_code": False,
        "library_versions": {"python": "3.11.7", "torch": "2.13.0+cpu"},
        **(run_config_extra or {}),
    }
    (out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2))
    return out_dir


class FillsUp(io.FileIO):
    """A file on a disk with `room` bytes left: the write that crosses it writes what fits,
    then raises ENOSPC, as write(2) does on a full disk."""

    room = 1500

    def write(self, b):
        left = self.room - self.tell()
        if len(b) > left:
            super().write(bytes(b[:max(left, 0)]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        return super().write(b)


def full_disk_open(path, mode="r", *args, **kwargs):
    """`open` for a module under test (monkeypatched in): files opened "wb" fill the disk."""
    if mode == "wb":
        return FillsUp(path, "wb")
    return open(path, mode, *args, **kwargs)
