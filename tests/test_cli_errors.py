"""Bad input for every stage script (GitHub issue 6): bad flags, missing files, empty data, an
output location that already holds something, broken config files.

Every row of CASES runs one script's main(argv) in this process, as the command line would
(cwd = a fresh workspace), and checks that it:
  - exits with the documented status: 2 for bad input (argparse's own status too), 1 where the
    run is refused as a failure (train/pilot into a folder holding a run, a failed --verify);
  - prints exactly one `error: ...` line on stderr holding what the row names (the file, the
    line or the flag, and what to do), never a traceback, never the usage block;
  - leaves every file and folder of the workspace as it was: nothing written, nothing removed,
    nothing touched (contents and modification times), no new file;
  - never echoes a record's value (a canary sits in the malformed lines).
A few rows also run as real subprocesses (test_real_process_*), which proves that what a user
sees in a terminal has no traceback either."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llama_sft.config import EvalArgs
from llama_sft.evaluation.evaluate import check_earlier_results, output_problems

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-live-CANARY-cli-7d1e"  # sits in malformed lines; must never be printed



# --------------------------------------------------------------------------------------
# The workspace: inputs, broken inputs and earlier outputs, in one folder per test
# --------------------------------------------------------------------------------------


def _rows(prefix: str, n: int) -> str:
    return "".join(json.dumps({"instruction": f"{prefix} question {i}?", "context": "",
                               "response": f"{prefix} answer {i}.", "category": "qa"}) + "\n"
                   for i in range(n))


def _chat_row() -> str:
    return json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                    {"role": "assistant", "content": "Hello."},
                                    {"role": "user", "content": "Bye?"},
                                    {"role": "assistant", "content": "Bye."}]}) + "\n"


def _turn(role: str, content: str = SECRET, key: str = "messages") -> dict:
    return {"role": role, "content": content} if key == "messages" else \
        {"from": role, "value": content}


# Line 2 of each file: a malformed conversation whose turns hold the canary.
BAD_CONVERSATIONS = {
    "chat_order": {"messages": [_turn("user"), _turn("user"), _turn("assistant")]},
    "chat_empty_turn": {"messages": [_turn("user"), _turn("assistant", " ")]},
    "chat_no_assistant": {"messages": [_turn("system"), _turn("user")]},
    "chat_unknown_role": {"messages": [_turn(SECRET), _turn("assistant")]},
    "sharegpt_order": {"conversations": [_turn("gpt", key="sharegpt"),
                                         _turn("human", key="sharegpt")]},
}


def write_safetensors(path: Path, n: int = 4) -> Path:
    """A small valid safetensors file, written by hand (no torch needed)."""
    header = json.dumps({"base_model.lora_A.weight": {"dtype": "F32", "shape": [n],
                                                      "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4 * n))
    return path


def make_adapter(folder: Path, *, weights: str = "good", config: str = "good") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
        if config == "good" else '{"peft_type": "LORA", ')
    (folder / "run_config.json").write_text(json.dumps({
        "stage": "train", "base_model": "smollm2-135m", "model_size": "135m",
        "prompt_format": "chat", "max_length": 256}))
    if weights == "good":
        write_safetensors(folder / "adapter_model.safetensors")
    elif weights == "truncated":
        data = write_safetensors(folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[:-6])
    elif weights == "pickle":
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    return folder


@dataclass
class Workspace:
    root: Path
    paths: dict[str, str] = field(default_factory=dict)

    def fmt(self, text: str) -> str:
        return text.format(**self.paths)


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    p: dict[str, Path] = {"ws": root}
    p["good"] = root / "data.jsonl"
    p["good"].write_text(_rows("data", 40))
    p["golden"] = root / "golden.jsonl"
    p["golden"].write_text(_rows("golden", 12))
    p["tiny"] = root / "tiny_golden.jsonl"
    p["tiny"].write_text(_rows("tiny", 3))
    p["empty"] = root / "empty.jsonl"
    p["empty"].write_text("")
    p["blank"] = root / "blank.jsonl"
    p["blank"].write_text("\n   \n\t\n")
    p["invalid"] = root / "all_invalid.jsonl"
    p["invalid"].write_text('[1, 2]\n{"instruction": "x", "response": ""}\n')
    p["malformed"] = root / "malformed.jsonl"
    p["malformed"].write_text(_rows("m", 1) + '{"instruction": "' + SECRET + '", "response": "\n'
                              + _rows("m2", 1))
    for name, turns in BAD_CONVERSATIONS.items():
        p[name] = root / f"{name}.jsonl"
        p[name].write_text(_chat_row() + json.dumps(turns) + "\n" + _chat_row())
    p["nope"] = root / "no_such_file.jsonl"
    p["cfg_unknown"] = root / "unknown_key.json"
    p["cfg_unknown"].write_text(json.dumps({"lora_rnak": 8}))
    p["cfg_invalid"] = root / "invalid.json"
    p["cfg_invalid"].write_text('{"lora_r": 8,\n')
    p["cfg_array"] = root / "array.json"
    p["cfg_array"].write_text("[1, 2]\n")
    p["cfg_type"] = root / "wrong_type.json"
    p["cfg_type"].write_text(json.dumps({"batch_size": "eight"}))
    p["cfg_eval_unknown"] = root / "eval_unknown.json"
    p["cfg_eval_unknown"].write_text(json.dumps({"num_sample": 5}))
    p["afile"] = root / "a_file"
    p["afile"].write_text("a file, not a folder\n")
    p["notes"] = root / "notes.txt"
    p["notes"].write_text("my notes: not a report, not results\n")
    p["notes_json"] = root / "notes.json"
    p["notes_json"].write_text(json.dumps({"owner": "someone else"}))
    # earlier outputs
    run = root / "run"  # a training run, as llama_train.py leaves it
    (run / "final_model").mkdir(parents=True)
    write_safetensors(run / "final_model" / "adapter_model.safetensors")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "train_results.json").write_text('{"status": "completed"}\n')
    (run / "notes.txt").write_text("keep me\n")
    p["run"] = run
    p["stray"] = root / "stray_run"  # only the results of an earlier run are left
    p["stray"].mkdir()
    (p["stray"] / "train_results.json").write_text('{"status": "completed"}\n')
    (p["stray"] / "test.jsonl").write_text(_rows("test", 2))
    p["pilot_done"] = root / "pilot_done"
    p["pilot_done"].mkdir()
    (p["pilot_done"] / "pilot_evaluation.json").write_text('{"go": true}\n')
    p["adapter"] = make_adapter(root / "adapter")
    p["adapter_truncated"] = make_adapter(root / "adapter_truncated", weights="truncated")
    p["adapter_pickle"] = make_adapter(root / "adapter_pickle", weights="pickle")
    p["adapter_badcfg"] = make_adapter(root / "adapter_badcfg", config="broken")
    p["results"] = root / "eval" / "results.json"  # another adapter's evaluation
    p["results"].parent.mkdir()
    p["results"].write_text(json.dumps({
        "stage": "evaluate", "model": {"adapter_sha256": "ab" * 32, "base_model": "smollm2-135m"},
        "dataset": {"path": "other.jsonl", "file_sha256": "cd" * 32}}))
    (p["results"].parent / "results_samples.jsonl").write_text(json.dumps(
        {"index": 0, "generation": "x", "reference": "y"}) + "\n")
    sha8 = hashlib.sha256((p["adapter"] / "adapter_model.safetensors").read_bytes()).hexdigest()[:8]
    p["packages"] = root / "packages"  # the package of this very adapter, made earlier
    p["packages"].mkdir()
    (p["packages"] / f"smollm2-135m-lora-{sha8}.tar.gz").write_bytes(b"an earlier package")
    p["archive"] = root / "small.tar.gz"  # a well-formed archive (one top folder)
    with tarfile.open(p["archive"], "w:gz") as tar:
        info = tarfile.TarInfo("pkg/README.md")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    p["new"] = root / "new_output"  # does not exist: nothing may create it
    monkeypatch.chdir(root)
    return Workspace(root, {k: str(v) for k, v in p.items()})


def snapshot(root: Path) -> dict[str, object]:
    """Every file (sha256, mtime) and folder (mtime: it changes when an entry is added or
    removed) under root."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        st = path.stat()
        if path.is_dir():
            out[rel + "/"] = st.st_mtime_ns
        else:
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    script: str               # module name
    id: str
    argv: list[str]           # {name} placeholders are paths of the workspace
    code: int                 # expected exit status
    needles: list[str]        # each must be in the error message ({name} placeholders too)

    @property
    def param_id(self) -> str:
        return f"{self.script.replace('llama_', '')}-{self.id}"


def C(script, id, argv, code, *needles):  # noqa: N802 - a table row
    return Case(f"llama_{script}", id, list(argv), code, list(needles))


UNKNOWN = "unrecognized arguments: --no-such-flag"
TRAIN_IN = ["--model-size", "135m", "--dataset", "{good}", "--output-dir", "{new}"]
PILOT_IN = ["--model-size", "135m", "--golden-set", "{golden}", "--output-dir", "{new}"]
EVAL_IN = ["--adapter-path", "{adapter}", "--dataset", "{good}", "--output", "{new}/r.json"]
PKG_IN = ["--adapter-path", "{adapter}", "--output-dir", "{new}", "--no-record-generation"]

CASES = [
    # ---------------------------------------------------------------- llama_config.py
    C("config", "unknown-flag", ["--no-such-flag"], 2, UNKNOWN, "llama_config.py --help"),
    C("config", "misspelt-flag", ["--lerning-rate", "1e-4"], 2, "--lerning-rate",
      "did you mean --learning-rate?"),
    C("config", "bad-type", ["--batch-size", "four"], 2, "--batch-size", "invalid int value: 'four'"),
    C("config", "bad-choice", ["--model-size", "8b"], 2, "--model-size", "invalid choice: '8b'"),
    C("config", "bad-value", ["--batch-size", "0"], 2, "--batch-size must be >= 1, got 0"),
    C("config", "missing-config", ["--config", "{nope}"], 2, "--config {nope}: file not found"),
    C("config", "config-is-folder", ["--config", "{run}"], 2, "--config {run} is a folder"),
    C("config", "config-unknown-key", ["--config", "{cfg_unknown}"], 2, "{cfg_unknown}",
      "unknown key 'lora_rnak'", "did you mean 'lora_r'?"),
    C("config", "config-invalid-json", ["--config", "{cfg_invalid}"], 2, "{cfg_invalid}",
      "not valid JSON (line 2, column 1"),
    C("config", "config-not-an-object", ["--config", "{cfg_array}"], 2, "{cfg_array}",
      "top level must be a JSON object"),
    C("config", "config-wrong-type", ["--config", "{cfg_type}"], 2,
      "'batch_size' must be an integer"),
    C("config", "missing-dataset", ["--dataset", "{nope}"], 2, "--dataset {nope}: file not found"),
    # ---------------------------------------------------------------- llama_dataset.py
    C("dataset", "unknown-flag", ["--dataset", "{good}", "--no-such-flag"], 2, UNKNOWN),
    C("dataset", "misspelt-flag", ["--datset", "{good}"], 2, "did you mean --dataset?"),
    C("dataset", "bad-type", ["--dataset", "{good}", "--max-length", "long"], 2,
      "--max-length", "invalid int value: 'long'"),
    C("dataset", "bad-choice", ["--dataset", "{good}", "--prompt-format", "chatml"], 2,
      "--prompt-format", "invalid choice: 'chatml'"),
    C("dataset", "no-config-flag", ["--dataset", "{good}", "--config", "{cfg_unknown}"], 2,
      "unrecognized arguments: --config"),
    C("dataset", "no-dataset", ["--report"], 2, "--dataset is required"),
    C("dataset", "missing-dataset", ["--dataset", "{nope}", "--report"], 2,
      "--dataset {nope}: file not found"),
    C("dataset", "dataset-is-folder", ["--dataset", "{run}"], 2, "--dataset {run} is a folder"),
    C("dataset", "missing-golden", ["--dataset", "{good}", "--golden-set", "{nope}"], 2,
      "--golden-set {nope}: file not found"),
    C("dataset", "empty-dataset", ["--dataset", "{empty}", "--report"], 2,
      "--dataset {empty}: no valid examples", "the file is empty"),
    C("dataset", "blank-dataset", ["--dataset", "{blank}", "--report"], 2,
      "--dataset {blank}: no valid examples", "only blank lines"),
    C("dataset", "all-lines-skipped", ["--dataset", "{invalid}", "--skip-invalid"], 2,
      "no valid examples", "all 2 non-blank line(s) were invalid",
      "run without --skip-invalid"),
    C("dataset", "malformed-line", ["--dataset", "{malformed}", "--report"], 2,
      "{malformed}:2: truncated JSON", "--skip-invalid"),
    C("dataset", "conversation-turn-order", ["--dataset", "{chat_order}", "--report"], 2,
      "{chat_order}:2: 'messages'[1] is a user turn where a user turn must be followed by an "
      "assistant turn", "--skip-invalid"),
    C("dataset", "conversation-empty-turn", ["--dataset", "{chat_empty_turn}", "--report"], 2,
      "{chat_empty_turn}:2: 'messages'[1] (assistant turn) is empty"),
    C("dataset", "conversation-no-assistant", ["--dataset", "{chat_no_assistant}", "--report"],
      2, "{chat_no_assistant}:2: 'messages' has no assistant turn"),
    C("dataset", "conversation-unknown-role", ["--dataset", "{chat_unknown_role}", "--report"],
      2, "{chat_unknown_role}:2: 'messages'[0] has an unknown role; use assistant, system, user"),
    C("dataset", "sharegpt-turn-order", ["--dataset", "{sharegpt_order}", "--report"], 2,
      "{sharegpt_order}:2: 'conversations'[0] is an assistant turn where the first turn"),
    C("dataset", "bad-field-map", ["--dataset", "{good}", "--field-map", "question"], 2,
      "--field-map 'question'", "is not SOURCE=TARGET"),
    C("dataset", "empty-golden", ["--dataset", "{good}", "--golden-set", "{empty}"], 2,
      "--golden-set {empty}: no valid examples"),
    C("dataset", "output-is-the-dataset", ["--dataset", "{good}", "--output", "{good}"], 2,
      "--output {good} is the --dataset file", "would destroy it"),
    C("dataset", "output-is-the-golden-set",
      ["--dataset", "{good}", "--golden-set", "{golden}", "--output", "{golden}"], 2,
      "--output {golden} is the --golden-set file"),
    C("dataset", "output-is-another-file", ["--dataset", "{good}", "--output", "{notes}"], 2,
      "--output {notes} exists and is not a report", "choose another --output"),
    C("dataset", "output-is-a-folder", ["--dataset", "{good}", "--output", "{run}"], 2,
      "--output {run} is a folder"),
    C("dataset", "output-under-a-file", ["--dataset", "{good}", "--output", "{afile}/r.json"], 2,
      "{afile} is a file, not a folder"),
    # ---------------------------------------------------------------- llama_pilot.py
    C("pilot", "unknown-flag", PILOT_IN + ["--no-such-flag"], 2, UNKNOWN),
    C("pilot", "misspelt-flag", ["--golden_set", "{golden}"], 2, "--golden_set",
      "did you mean --golden-set?"),
    C("pilot", "bad-type", PILOT_IN + ["--max-steps", "ten"], 2, "--max-steps",
      "invalid int value: 'ten'"),
    C("pilot", "bad-choice", ["--model-size", "8b"], 2, "invalid choice: '8b'"),
    C("pilot", "default-golden-set-missing", ["--model-size", "135m"], 2,
      "--golden-set ./sft_output/golden_set.jsonl: file not found"),
    C("pilot", "missing-golden", ["--model-size", "135m", "--golden-set", "{nope}"], 2,
      "--golden-set {nope}: file not found"),
    C("pilot", "missing-dataset", PILOT_IN + ["--dataset", "{nope}"], 2,
      "--dataset {nope}: file not found"),
    C("pilot", "empty-golden", ["--model-size", "135m", "--golden-set", "{empty}",
                                "--output-dir", "{new}"], 2,
      "--golden-set {empty}: no valid examples"),
    C("pilot", "malformed-golden", ["--model-size", "135m", "--golden-set", "{malformed}",
                                    "--output-dir", "{new}"], 2, "{malformed}:2:"),
    C("pilot", "conversation-golden", ["--model-size", "135m", "--golden-set",
                                       "{chat_empty_turn}", "--output-dir", "{new}"], 2,
      "{chat_empty_turn}:2: 'messages'[1] (assistant turn) is empty"),
    C("pilot", "golden-too-small", ["--model-size", "135m", "--golden-set", "{tiny}",
                                    "--output-dir", "{new}"], 2,
      "--golden-set {tiny}: 3 examples", "needs at least 4 and 2"),
    C("pilot", "missing-config", PILOT_IN + ["--config", "{nope}"], 2,
      "--config {nope}: file not found"),
    C("pilot", "config-unknown-key", PILOT_IN + ["--config", "{cfg_unknown}"], 2,
      "unknown key 'lora_rnak'"),
    C("pilot", "config-invalid-json", PILOT_IN + ["--config", "{cfg_invalid}"], 2,
      "{cfg_invalid}: not valid JSON"),
    C("pilot", "resume-missing-checkpoint", PILOT_IN + ["--resume", "{new}/checkpoint-5"], 2,
      "--resume {new}/checkpoint-5: no such checkpoint folder"),
    C("pilot", "output-holds-a-run", ["--model-size", "135m", "--golden-set", "{golden}",
                                      "--output-dir", "{run}"], 2,
      "--output-dir {run} already holds a training run", "--resume auto",
      "nothing was overwritten"),
    C("pilot", "output-holds-a-pilot-result", ["--model-size", "135m", "--golden-set",
                                               "{golden}", "--output-dir", "{pilot_done}"], 2,
      "--output-dir {pilot_done} already holds pilot_evaluation.json", "nothing was overwritten"),
    C("pilot", "output-is-a-file", ["--model-size", "135m", "--golden-set", "{golden}",
                                    "--output-dir", "{afile}"], 2,
      "--output-dir {afile} is a file, not a folder"),
    # ---------------------------------------------------------------- llama_train.py
    C("train", "unknown-flag", TRAIN_IN + ["--no-such-flag"], 2, UNKNOWN),
    C("train", "misspelt-flag", TRAIN_IN + ["--lerning-rate", "1e-4"], 2,
      "did you mean --learning-rate?"),
    C("train", "abbreviated-flag", TRAIN_IN + ["--batch", "8"], 2,
      "unrecognized arguments: --batch 8", "did you mean --batch-size?"),
    C("train", "bad-type", TRAIN_IN + ["--batch-size", "four"], 2, "invalid int value: 'four'"),
    C("train", "bad-choice", ["--model-size", "8b"], 2, "invalid choice: '8b'"),
    C("train", "boolean-with-a-value", TRAIN_IN + ["--use-4bit=yes"], 2, "--use-4bit",
      "ignored explicit argument 'yes'"),
    C("train", "bad-values", TRAIN_IN + ["--batch-size", "0", "--learning-rate", "2"], 2,
      "--batch-size must be >= 1, got 0", "--learning-rate must be in (0, 1), got 2.0"),
    C("train", "no-dataset", ["--model-size", "135m", "--output-dir", "{new}"], 2,
      "--dataset is required"),
    C("train", "missing-dataset", ["--model-size", "135m", "--dataset", "{nope}"], 2,
      "--dataset {nope}: file not found"),
    C("train", "dataset-is-folder", ["--model-size", "135m", "--dataset", "{run}"], 2,
      "--dataset {run} is a folder"),
    C("train", "missing-golden", TRAIN_IN + ["--golden-set", "{nope}"], 2,
      "--golden-set {nope}: file not found"),
    C("train", "conversation-dataset", ["--model-size", "135m", "--dataset", "{chat_order}",
                                        "--output-dir", "{new}"], 2,
      "{chat_order}:2: 'messages'[1] is a user turn"),
    C("train", "empty-dataset", ["--model-size", "135m", "--dataset", "{empty}",
                                 "--output-dir", "{new}"], 2,
      "--dataset {empty}: no valid examples", "the file is empty"),
    C("train", "malformed-dataset", ["--model-size", "135m", "--dataset", "{malformed}",
                                     "--output-dir", "{new}"], 2,
      "{malformed}:2: truncated JSON"),
    C("train", "empty-golden", TRAIN_IN + ["--golden-set", "{blank}"], 2,
      "--golden-set {blank}: no valid examples"),
    C("train", "missing-config", TRAIN_IN + ["--config", "{nope}"], 2,
      "--config {nope}: file not found"),
    C("train", "config-unknown-key", TRAIN_IN + ["--config", "{cfg_unknown}"], 2,
      "{cfg_unknown}: unknown key 'lora_rnak' (did you mean 'lora_r'?)"),
    C("train", "config-invalid-json", TRAIN_IN + ["--config", "{cfg_invalid}"], 2,
      "{cfg_invalid}: not valid JSON (line 2"),
    C("train", "config-wrong-type", TRAIN_IN + ["--config", "{cfg_type}"], 2,
      "{cfg_type}: key 'batch_size' must be an integer"),
    C("train", "output-holds-a-run", ["--model-size", "135m", "--dataset", "{good}",
                                      "--output-dir", "{run}"], 2,
      "--output-dir {run} already holds a training run", "--resume auto",
      "nothing was overwritten"),
    C("train", "output-holds-earlier-results", ["--model-size", "135m", "--dataset", "{good}",
                                                "--output-dir", "{stray}"], 2,
      "--output-dir {stray} already holds train_results.json, test.jsonl",
      "nothing was overwritten"),
    C("train", "output-is-a-file", ["--model-size", "135m", "--dataset", "{good}",
                                    "--output-dir", "{afile}"], 2,
      "--output-dir {afile} is a file, not a folder"),
    C("train", "output-under-a-file", ["--model-size", "135m", "--dataset", "{good}",
                                       "--output-dir", "{afile}/run"], 2,
      "{afile} is a file, not a folder"),
    # ---------------------------------------------------------------- llama_evaluate.py
    C("evaluate", "unknown-flag", EVAL_IN + ["--no-such-flag"], 2, UNKNOWN),
    C("evaluate", "misspelt-flag", ["--adaptor-path", "{adapter}"], 2,
      "did you mean --adapter-path?"),
    C("evaluate", "bad-type", EVAL_IN + ["--num-samples", "all"], 2,
      "--num-samples", "invalid int value: 'all'"),
    C("evaluate", "bad-choice", EVAL_IN + ["--dtype", "float8"], 2, "invalid choice: 'float8'"),
    C("evaluate", "no-dataset", ["--adapter-path", "{adapter}", "--output", "{new}/r.json"], 2,
      "--dataset is required"),
    C("evaluate", "missing-adapter", ["--adapter-path", "{nope}", "--dataset", "{good}"], 2,
      "--adapter-path {nope}: no such folder"),
    C("evaluate", "adapter-without-safetensors",
      ["--adapter-path", "{adapter_pickle}", "--dataset", "{good}"], 2,
      "--adapter-path {adapter_pickle}: no adapter_model.safetensors"),
    C("evaluate", "adapter-truncated", ["--adapter-path", "{adapter_truncated}", "--dataset",
                                        "{good}"], 2,
      "--adapter-path {adapter_truncated}: adapter_model.safetensors is truncated"),
    C("evaluate", "adapter-config-broken", ["--adapter-path", "{adapter_badcfg}", "--dataset",
                                            "{good}"], 2, "adapter_config.json is not valid JSON"),
    C("evaluate", "missing-test-set", ["--adapter-path", "{adapter}", "--dataset",
                                       "{run}/test.jsonl"], 2,
      "--dataset {run}/test.jsonl: file not found"),
    C("evaluate", "empty-test-set", ["--adapter-path", "{adapter}", "--dataset", "{empty}"], 2,
      "--dataset {empty}: no valid examples"),
    C("evaluate", "malformed-test-set", ["--adapter-path", "{adapter}", "--dataset",
                                         "{malformed}"], 2, "{malformed}:2: truncated JSON"),
    C("evaluate", "conversation-test-set", ["--adapter-path", "{adapter}", "--dataset",
                                            "{sharegpt_order}"], 2,
      "{sharegpt_order}:2: 'conversations'[0] is an assistant turn"),
    C("evaluate", "missing-config", EVAL_IN + ["--config", "{nope}"], 2,
      "--config {nope}: file not found"),
    C("evaluate", "config-unknown-key", EVAL_IN + ["--config", "{cfg_eval_unknown}"], 2,
      "unknown key 'num_sample' (did you mean 'num_samples'?)"),
    C("evaluate", "config-invalid-json", EVAL_IN + ["--config", "{cfg_invalid}"], 2,
      "{cfg_invalid}: not valid JSON"),
    C("evaluate", "output-is-the-test-set", ["--adapter-path", "{adapter}", "--dataset",
                                             "{good}", "--output", "{good}"], 2,
      "--output {good} is the --dataset file"),
    C("evaluate", "samples-output-is-the-test-set",
      EVAL_IN + ["--samples-output", "{good}"], 2, "--samples-output {good} is the --dataset file"),
    C("evaluate", "output-holds-another-evaluation",
      ["--adapter-path", "{adapter}", "--dataset", "{good}", "--output", "{results}"], 2,
      "--output {results} holds the results of another evaluation", "abababababab",
      "--overwrite", "nothing was written"),
    C("evaluate", "output-is-another-file", ["--adapter-path", "{adapter}", "--dataset",
                                             "{good}", "--output", "{notes_json}"], 2,
      "--output {notes_json} exists and is not a results file", "--overwrite"),
    C("evaluate", "samples-output-is-another-file", EVAL_IN + ["--samples-output", "{notes}"], 2,
      "--samples-output {notes} exists and is not a samples file"),
    C("evaluate", "output-is-a-folder", ["--adapter-path", "{adapter}", "--dataset", "{good}",
                                         "--output", "{run}"], 2, "--output {run} is a folder"),
    # ---------------------------------------------------------------- llama_package.py
    C("package", "unknown-flag", PKG_IN + ["--no-such-flag"], 2, UNKNOWN),
    C("package", "misspelt-flag", ["--adapter-pth", "{adapter}"], 2,
      "did you mean --adapter-path?"),
    C("package", "bad-choice", PKG_IN + ["--merge-dtype", "float8"], 2, "invalid choice: 'float8'"),
    C("package", "bad-size", PKG_IN + ["--model-size", "8b"], 2, "invalid choice: '8b'"),
    C("package", "no-config-flag", PKG_IN + ["--config", "{cfg_unknown}"], 2,
      "unrecognized arguments: --config"),
    C("package", "no-adapter", ["--output-dir", "{new}"], 2, "--adapter-path is required"),
    C("package", "missing-adapter", ["--adapter-path", "{nope}", "--output-dir", "{new}"], 2,
      "--adapter-path {nope}: no such folder"),
    C("package", "adapter-without-safetensors", ["--adapter-path", "{adapter_pickle}",
                                                 "--output-dir", "{new}"], 2,
      "no adapter_model.safetensors"),
    C("package", "adapter-truncated", ["--adapter-path", "{adapter_truncated}", "--output-dir",
                                       "{new}"], 2, "adapter_model.safetensors is truncated"),
    C("package", "adapter-config-broken", ["--adapter-path", "{adapter_badcfg}", "--output-dir",
                                           "{new}"], 2, "adapter_config.json is not valid JSON"),
    C("package", "missing-eval-results", PKG_IN + ["--eval-results", "{nope}"], 2,
      "--eval-results {nope}: file not found"),
    C("package", "eval-results-invalid-json", PKG_IN + ["--eval-results", "{cfg_invalid}"], 2,
      "--eval-results {cfg_invalid}: not valid JSON"),
    C("package", "eval-results-of-another-adapter", PKG_IN + ["--eval-results", "{results}"], 2,
      "--eval-results {results} evaluated another adapter"),
    C("package", "package-exists", ["--adapter-path", "{adapter}", "--output-dir", "{packages}",
                                     "--no-record-generation"], 2,
      "already exists", "pass --overwrite to replace the package, or --name for a new one"),
    C("package", "output-dir-is-a-file", ["--adapter-path", "{adapter}", "--output-dir",
                                          "{afile}"], 2,
      "--output-dir {afile} is a file, not a folder"),
    C("package", "verify-missing-archive", ["--verify", "{nope}"], 2,
      "--verify {nope}: file not found"),
    C("package", "verify-not-an-archive", ["--verify", "{afile}"], 1,
      "verification failed", "{afile}: not a readable .tar.gz"),
    C("package", "verify-extract-to-not-empty", ["--verify", "{archive}", "--extract-to",
                                                 "{run}"], 2,
      "--extract-to {run}: folder is not empty"),
    C("package", "verify-extract-to-a-file", ["--verify", "{archive}", "--extract-to",
                                              "{afile}"], 2,
      "--extract-to {afile} is a file, not a folder"),
]

SCRIPTS = ("llama_config", "llama_dataset", "llama_pilot", "llama_train", "llama_evaluate",
           "llama_package")
CATEGORIES = ("unknown-flag", "misspelt-flag", "bad-choice")


def test_the_table_covers_every_script_and_every_kind_of_bad_input():
    ids = {(c.script, c.id) for c in CASES}
    assert len(ids) == len(CASES), "duplicate row ids"
    for script in SCRIPTS:
        for kind in CATEGORIES:
            assert (script, kind) in ids, (script, kind)
        rows = [c.id for c in CASES if c.script == script]
        assert any(i.startswith(("missing-", "verify-missing")) for i in rows), script
    for script in ("llama_config", "llama_pilot", "llama_train", "llama_evaluate"):
        rows = {c.id for c in CASES if c.script == script}
        assert {"config-unknown-key", "config-invalid-json"} <= rows, script
    for script in ("llama_dataset", "llama_pilot", "llama_train", "llama_evaluate"):
        assert any("empty" in c.id for c in CASES if c.script == script), script
    for script in ("llama_dataset", "llama_pilot", "llama_train", "llama_evaluate", "llama_package"):
        assert any(c.id.startswith(("output-", "package-exists")) for c in CASES
                   if c.script == script), script


def run_main(script: str, argv: list[str]) -> int:
    """main(argv) as the command line runs it: argparse's exit becomes the exit status."""
    module = importlib.import_module(script)
    try:
        return module.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def check_one_clear_error(case: Case, ws: Workspace, code: int, out: str, err: str) -> None:
    assert code == case.code, f"exit {code}, expected {case.code}\nstderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert "usage:" not in err, "the usage block instead of one line:\n" + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one `error:` line:\n{err}"
    message = err[err.index("error:"):]
    for needle in case.needles:
        assert ws.fmt(needle) in message, f"{ws.fmt(needle)!r} not in:\n{message}"
    assert SECRET not in err + out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.param_id) for c in CASES])
def test_bad_input_gives_one_clear_error_and_touches_nothing(case, ws, capsys):
    argv = [ws.fmt(a) for a in case.argv]
    before = snapshot(ws.root)
    code = run_main(case.script, argv)
    captured = capsys.readouterr()
    check_one_clear_error(case, ws, code, captured.out, captured.err)
    assert snapshot(ws.root) == before, "the failed command changed the workspace"


# --------------------------------------------------------------------------------------
# The same through real processes: what a user sees in a terminal
# --------------------------------------------------------------------------------------

REAL_PROCESS = ["config-config-invalid-json", "dataset-malformed-line",
                "pilot-output-holds-a-run", "train-output-holds-a-run",
                "evaluate-output-holds-another-evaluation", "package-package-exists",
                "train-misspelt-flag"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.param_id) for c in CASES
                                  if c.param_id in REAL_PROCESS])
def test_real_process_prints_one_error_and_no_traceback(case, ws):
    argv = [ws.fmt(a) for a in case.argv]
    before = snapshot(ws.root)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / f"{case.script}.py"), *argv],
                          capture_output=True, text=True, timeout=300, cwd=ws.root, env=env)
    check_one_clear_error(case, ws, proc.returncode, proc.stdout, proc.stderr)
    assert snapshot(ws.root) == before


def test_real_processes_cover_every_script():
    assert {c.script for c in CASES if c.param_id in REAL_PROCESS} == set(SCRIPTS)


# --------------------------------------------------------------------------------------
# The refusals are not over-broad: what is allowed still works
# --------------------------------------------------------------------------------------


def test_misspelt_flag_suggestion_and_unknown_flag_without_one(capsys):
    import llama_train

    with pytest.raises(SystemExit) as e:
        llama_train.build_parser().parse_args(["--gradient-acumulation-steps", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unrecognized arguments:")
    assert "did you mean --gradient-accumulation-steps?" in err
    with pytest.raises(SystemExit):
        llama_train.build_parser().parse_args(["--zzzz"])
    err = capsys.readouterr().err
    assert "did you mean" not in err and "--zzzz" in err
    with pytest.raises(SystemExit) as e:
        llama_train.build_parser().parse_args(["--help"])
    assert e.value.code == 0 and "usage: llama_train.py" in capsys.readouterr().out


def test_evaluate_replaces_the_same_evaluation_and_refuses_another_unless_overwrite(ws, caplog):
    from llama_sft.errors import ConfigError

    out = Path(ws.paths["results"])
    cfg = EvalArgs(adapter_path=ws.paths["adapter"], dataset=ws.paths["good"],
                                  output=str(out))
    assert output_problems(cfg) == []  # our own results file: not refused here
    same = {"base_model": "smollm2-135m", "adapter_sha256": "ab" * 32, "dataset_sha": "cd" * 32}
    with caplog.at_level(logging.WARNING, logger="llama_sft"):
        logging.getLogger("llama_sft").propagate = True
        check_earlier_results(cfg, base_model=same["base_model"],
                                             adapter_sha=same["adapter_sha256"],
                                             dataset_sha=same["dataset_sha"])
    assert "same adapter on the same data" in caplog.text
    with pytest.raises(ConfigError, match="holds the results of another evaluation"):
        check_earlier_results(cfg, base_model="smollm2-135m",
                                             adapter_sha="ef" * 32, dataset_sha="cd" * 32)
    with pytest.raises(ConfigError, match="another evaluation"):  # same adapter, other data
        check_earlier_results(cfg, base_model="smollm2-135m",
                                             adapter_sha="ab" * 32, dataset_sha="00" * 32)
    cfg.overwrite = True
    check_earlier_results(cfg, base_model="smollm2-135m", adapter_sha="ef" * 32,
                                         dataset_sha="cd" * 32)
    cfg.output = ws.paths["notes_json"]
    assert output_problems(cfg) == []  # --overwrite: any file may be replaced
    cfg.output = ws.paths["good"]
    assert "is the --dataset file" in output_problems(cfg)[0]  # never that one
    cfg.overwrite, cfg.output = False, str(Path(ws.paths["new"]) / "fresh.json")
    assert output_problems(cfg) == []


def test_train_and_pilot_resume_into_their_own_folder_is_allowed(ws):
    from llama_sft.errors import BadInput, RunSetupError
    from llama_sft.layout import RUN_OUTPUTS
    from llama_sft.training.outputs import check_output_dir

    for name in ("stray", "run"):
        check_output_dir(Path(ws.paths[name]), "auto")  # --resume: no refusal
        with pytest.raises(RunSetupError) as refused:
            check_output_dir(Path(ws.paths[name]), None)
        assert isinstance(refused.value, BadInput)  # exit 2, not a failed run
    check_output_dir(Path(ws.paths["new"]), None)  # a new folder
    empty = Path(ws.paths["ws"]) / "empty_dir"
    empty.mkdir()
    (empty / "unrelated.txt").write_text("x")
    check_output_dir(empty, None, RUN_OUTPUTS + ("pilot_evaluation.json",))


def test_dataset_report_replaces_an_earlier_report_and_says_so(ws, tokenizer, capsys):
    import llama_dataset

    out = Path(ws.paths["ws"]) / "report.json"
    assert llama_dataset.main(["--dataset", ws.paths["good"], "--output", str(out)]) == 0
    first = json.loads(out.read_text())
    assert first["examples"] == 40
    capsys.readouterr()
    assert llama_dataset.main(["--dataset", ws.paths["golden"], "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(out.read_text())["examples"] == 12
    assert f"replacing {out} (an earlier report on {ws.paths['good']}" in captured.err
    assert not list(out.parent.glob(".report.json.tmp"))  # written atomically


def test_run_cli_maps_errors_to_one_line_and_an_exit_status(capsys):
    from llama_sft.cli import run_cli
    from llama_sft.errors import ConfigError, TrainingError

    def raising(exc):
        def body():
            raise exc
        return body

    cases = [(ConfigError("bad flag"), 2, "error: bad flag"),
             (TrainingError("loss is nan at step 3"), 1, "error: loss is nan at step 3"),
             (FileNotFoundError(2, "No such file or directory", "/x/y"), 2,
              "error: /x/y: No such file or directory"),
             (PermissionError(13, "Permission denied", "/x"), 2, "error: /x: Permission denied"),
             (OSError(28, "No space left on device", "/x/z"), 1,
              "error: /x/z: No space left on device"),
             (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C)")]
    for exc, code, line in cases:
        assert run_cli(raising(exc)) == code
        assert capsys.readouterr().err == line + "\n"
    with pytest.raises(SystemExit):  # argparse's exit and --help pass through
        run_cli(raising(SystemExit(2)))
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(raising(ZeroDivisionError("bug")))
    assert run_cli(lambda: 0) == 0


def test_safetensors_problem_reads_only_the_header(tmp_path):
    from llama_sft.files import safetensors_problem

    good = write_safetensors(tmp_path / "a.safetensors")
    assert safetensors_problem(good) is None
    data = good.read_bytes()
    for name, blob in [("empty", b""), ("short", data[:5]), ("cut", data[:-1]),
                       ("huge-header", (10**9).to_bytes(8, "little") + b"{}"),
                       ("not-json", (4).to_bytes(8, "little") + b"abcd")]:
        (tmp_path / name).write_bytes(blob)
        assert safetensors_problem(tmp_path / name), name
