"""Every stage script answers --help quickly, without heavy imports, and shows its main flags.

The stage scripts are listed explicitly (STAGE_SCRIPTS): a missing one, or one without an
`if __name__ == "__main__":` block, fails here rather than being skipped."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The flags the guide (shared/spec/llama_finetuning_guide.md) and the module docstrings use.
MAIN_FLAGS = {
    "llama_config.py": ["--model-size", "--config", "--estimate", "--json", "--lora-r",
                        "--batch-size", "--learning-rate"],
    "llama_dataset.py": ["--dataset", "--golden-set", "--field-map", "--skip-invalid",
                         "--report", "--output", "--model-size", "--max-length"],
    "llama_model.py": ["LLAMA_SFT_CACHE"],  # no flags: it converts and prints the folder
    "llama_pilot.py": ["--golden-set", "--output-dir"],
    "llama_train.py": ["--model-size", "--dataset", "--golden-set", "--output-dir", "--config",
                       "--use-4bit", "--use-wandb", "--lora-r", "--batch-size",
                       "--learning-rate", "--num-epochs", "--eval-steps"],
    "llama_evaluate.py": ["--base-model", "--adapter-path", "--dataset", "--output",
                          "--num-samples", "--use-4bit"],
    "llama_package.py": ["--adapter-path", "--base-model", "--model-size", "--output-dir"],
    "llama_chat.py": ["--adapter-path", "--model", "--base-model", "--model-size", "--prompt",
                      "--system", "--max-new-tokens", "--do-sample"],
}
HEAVY_MODULES = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
                 "wandb", "safetensors", "numpy", "tokenizers", "huggingface_hub"}


STAGE_SCRIPTS = ["llama_config.py", "llama_dataset.py", "llama_model.py", "llama_pilot.py",
                 "llama_train.py", "llama_evaluate.py", "llama_package.py", "llama_chat.py"]
MAIN_GUARD = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)


def test_every_stage_script_is_listed_with_its_flags():
    assert set(MAIN_FLAGS) == set(STAGE_SCRIPTS)
    on_disk = {p.name for p in ROOT.glob("llama_*.py")}
    unlisted_or_missing = sorted(on_disk ^ set(STAGE_SCRIPTS))
    assert not unlisted_or_missing, f"stage scripts unlisted or missing: {unlisted_or_missing}"


@pytest.mark.parametrize("name", STAGE_SCRIPTS)
def test_script_exists_and_has_a_main_guard(name):
    path = ROOT / name
    assert path.is_file(), f"{name} is missing"
    assert MAIN_GUARD.search(path.read_text(encoding="utf-8")), (
        f'{name} has no `if __name__ == "__main__":` block')


def _run_help(name: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / name), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    return proc, time.monotonic() - start


def _imported_top_level_modules(importtime_stderr: str) -> set[str]:
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            module = line.rsplit("|", 1)[1].strip()
            names.add(module.split(".")[0])
    return names


@pytest.mark.parametrize("name", STAGE_SCRIPTS)
def test_help_exits_0_quickly_and_shows_the_main_flags(name):
    proc, elapsed = _run_help(name)
    assert proc.returncode == 0, proc.stderr[-2000:]
    help_text = proc.stdout
    assert help_text.startswith(f"usage: {name}"), help_text[:300]
    for flag in MAIN_FLAGS.get(name, []):
        assert flag in help_text, f"{name} --help does not mention {flag}"
    heavy = _imported_top_level_modules(proc.stderr) & HEAVY_MODULES
    assert not heavy, f"{name} --help imports {sorted(heavy)}: move them into the functions"
    # Deterministic check above; this only catches something pathological (no heavy import
    # answers in ~0.2 s here; importing torch alone takes several seconds on these machines).
    assert elapsed < 10, f"{name} --help took {elapsed:.1f} s"


@pytest.mark.parametrize("name", STAGE_SCRIPTS)
def test_unknown_flag_exits_2(name):
    proc = subprocess.run([sys.executable, str(ROOT / name), "--no-such-flag"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert "--no-such-flag" in proc.stderr
