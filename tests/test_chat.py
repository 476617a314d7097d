"""llama_chat: --prompt prints exactly generate()'s greedy answer (adapter folder, package archive,
merged model, stdin); the interactive loop keeps the history in the training format, and /system,
/reset, /exit, end of input, Ctrl-C and the context limit behave; bad input is one `error:` line
and exit 2. Fast tests use the tiny LLaMA; the slow ones the embedded model, one in tmux."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from helpers import make_adapter

import llama_chat
import llama_package
from llama_sft.config import ChatArgs
from llama_sft.data.prompts import render_conversation
from llama_sft.evaluation.generate import generate
from llama_sft.inference.chat import (
    Conversation,
    TrimmedWriter,
    fit_prompt,
    load_chat_model,
    stream_answer,
)
from llama_sft.modeling.load import load_for_inference

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Name three primary colors."
NEW = 10  # --max-new-tokens of the fast tests
PROMPT_LOG = re.compile(r"DEBUG prompt \((\d+) tokens\): (.*)$", re.M)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    # std 0.3: on the 64-wide random model, 0.02 does not change a single greedy token.
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("chat_run") / "final_model",
                        lora_b_std=0.3)


@pytest.fixture(scope="module")
def tuned(tiny_adapter):
    """(model, tokenizer) of the adapter on its base, in float32 as the chat loads it on a CPU."""
    import torch

    model, tok, _ = load_for_inference(adapter_path=str(tiny_adapter), dtype=torch.float32)
    return model, tok


@pytest.fixture(scope="module")
def package(tiny_adapter, tmp_path_factory) -> Path:
    """The packages folder: NAME.tar.gz (+ .sha256) and NAME-merged/, as llama_package.py
    writes them."""
    out = tmp_path_factory.mktemp("chat_packages")
    assert llama_package.main(["--adapter-path", str(tiny_adapter), "--output-dir", str(out),
                               "--merge", "--no-record-generation"]) == 0
    return out


def chat_prompt(tok, messages) -> str:
    return render_conversation(tok, "chat", messages, add_generation_prompt=True)


def greedy(model, tok, prompt: str, max_new_tokens: int = NEW) -> str:
    return generate(model, tok, [prompt], max_new_tokens=max_new_tokens)[0].text


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def logged_prompts(stderr: str) -> list[str]:
    return [json.loads(m.group(2)) for m in PROMPT_LOG.finditer(stderr)]


# ---------------------------------------------------------------------------------------------
# --prompt: one answer, exactly generate()'s
# ---------------------------------------------------------------------------------------------


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        llama_chat.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--adapter-path", "--model", "--prompt", "--system", "--max-new-tokens",
                 "--do-sample", "--temperature", "--top-p", "--seed", "--context-length"):
        assert flag in out


def test_prompt_prints_exactly_the_greedy_answer(tiny_adapter, tuned, capsys):
    model, tok = tuned
    expected = greedy(model, tok, chat_prompt(tok, [user(QUESTION)]))
    assert expected, "the tiny adapter should say something"
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--prompt", QUESTION,
                            "--max-new-tokens", str(NEW)]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"  # only the answer on stdout; logs go to stderr
    assert f"loading adapter {tiny_adapter}" in err

    system = {"role": "system", "content": "Answer like a pirate."}
    expected = greedy(model, tok, chat_prompt(tok, [system, user(QUESTION)]))
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--prompt", QUESTION,
                            "--system", system["content"], "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_prompt_dash_reads_stdin(tiny_adapter, tuned, capsys, monkeypatch):
    model, tok = tuned
    question = "What is 12 times 7?\nShow the steps."
    expected = greedy(model, tok, chat_prompt(tok, [user(question)]))
    monkeypatch.setattr(sys, "stdin", io.StringIO(question + "\n"))
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--prompt", "-",
                            "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == expected + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--prompt", "-"]) == 2
    assert capsys.readouterr().err.strip() == "error: --prompt -: nothing on stdin"


def test_trimmed_writer_writes_what_strip_leaves():
    for chunks in (["\n  Hello", " world", " \n", "", "  again.\n\n"], [" ", "\n"], ["a b"]):
        out = io.StringIO()
        writer = TrimmedWriter(out)
        for chunk in chunks:
            writer.write(chunk)
        assert out.getvalue() == "".join(chunks).strip()


def test_package_archive_loads_and_leaves_no_temporary_files(package, tuned, tmp_path, capsys,
                                                             monkeypatch):
    model, tok = tuned
    expected = greedy(model, tok, chat_prompt(tok, [user(QUESTION)]))
    archive = next(package.glob("*.tar.gz"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert llama_chat.main(["--adapter-path", str(archive), "--prompt", QUESTION,
                            "--max-new-tokens", str(NEW)]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "archive sha256 matches" in err and "SHA256SUMS:" in err  # checked, on stderr
    assert list(tmp_path.iterdir()) == []  # the extracted package was removed


def test_merged_model_folder_loads(package, capsys):
    import torch

    merged = next(p for p in package.iterdir() if p.name.endswith("-merged"))
    model, tok, _ = load_for_inference(base_model=str(merged), dtype=torch.float32)
    expected = greedy(model, tok, chat_prompt(tok, [user(QUESTION)]))
    assert llama_chat.main(["--model", str(merged), "--prompt", QUESTION,
                            "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == expected + "\n"


def _tampered(package: Path, tmp_path: Path) -> Path:
    """The package with one bit flipped in the adapter weights, repacked."""
    archive = next(package.glob("*.tar.gz"))
    name = archive.name[: -len(".tar.gz")]
    work = tmp_path / "unpacked"
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(work, filter="data")
    weights = work / name / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(tampered, "w:gz") as tar:
        tar.add(work / name, arcname=name)
    return tampered


def test_tampered_archive_is_refused_with_exit_2(package, tmp_path, capsys):
    tampered = _tampered(package, tmp_path)
    assert llama_chat.main(["--adapter-path", str(tampered), "--prompt", QUESTION]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in err
    assert "verification failed" in error_lines[0]
    assert "adapter_model.safetensors does not match SHA256SUMS" in error_lines[0]
    # beside a published sha256 that does not match, it is refused before it is opened
    original = next(package.glob("*.tar.gz.sha256"))
    shutil.copyfile(original, tmp_path / "tampered.tar.gz.sha256")
    assert llama_chat.main(["--adapter-path", str(tampered), "--prompt", QUESTION]) == 2
    assert "the archive was modified" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 2
# ---------------------------------------------------------------------------------------------


def _bad_input_cases(root: Path, tiny_llama_dir: Path, adapter: Path):
    neither = root / "notes"
    neither.mkdir(exist_ok=True)
    (neither / "readme.txt").write_text("not a model")
    return [
        (["--adapter-path", str(root / "nope")], f"--adapter-path {root / 'nope'}: no such file"),
        (["--model", str(root / "nope")], f"--model {root / 'nope'}: no such file or folder"),
        (["--adapter-path", str(neither)], "neither an adapter folder"),
        (["--model", str(neither)], "neither an adapter folder"),
        (["--adapter-path", str(tiny_llama_dir)], "is a model folder (config.json, no "
                                                  "adapter_config.json); pass it with --model"),
        (["--model", str(adapter)], "is an adapter folder; pass it with --adapter-path"),
        ([], "say what to chat with"),
        (["--adapter-path", str(adapter), "--model", str(tiny_llama_dir)], "exclude each other"),
        (["--model-size", "135m", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--model-size", "135m", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--model-size", "135m", "--prompt", "  "], "--prompt is empty"),
        (["--model-size", "135m", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ]


def test_bad_input_is_one_error_line_and_exit_2(tmp_path, tiny_llama_dir, tiny_adapter, capsys):
    for args, message in _bad_input_cases(tmp_path, tiny_llama_dir, tiny_adapter):
        try:
            rc = llama_chat.main([*args, "--prompt", QUESTION] if "--prompt" not in args
                                 else args)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        out, err = capsys.readouterr()
        assert rc == 2, (args, err)
        assert out == "" and "Traceback" not in err, args
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, err)


def test_message_longer_than_the_context(tiny_adapter, capsys, monkeypatch):
    long = "word " * 200
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--prompt", long,
                            "--context-length", "64"]) == 2
    assert "does not fit the context of 64 tokens" in capsys.readouterr().err
    # in the chat: said on stderr, and the chat goes on
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\nShort one\n"))
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--context-length", "64",
                            "--max-new-tokens", "4", "-v"]) == 0
    out, err = capsys.readouterr()
    assert "error: the message is" in err
    assert len(logged_prompts(err)) == 1 and out.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# The interactive loop, driven through main() with a fake stdin
# ---------------------------------------------------------------------------------------------


def test_history_is_kept_in_the_training_format_and_commands_work(tiny_adapter, tuned, capsys,
                                                                    monkeypatch):
    model, tok = tuned
    q1, q2, q3, q4 = ("First question?", "Second question?", "Third question?",
                      "Fourth question?")
    lines = [q1, q2, "/system Be brief.", "", q3, "/reset", q4, "/exit", "Never sent"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--max-new-tokens", str(NEW),
                            "-v"]) == 0
    out, err = capsys.readouterr()
    system = {"role": "system", "content": "Be brief."}
    p1 = chat_prompt(tok, [user(q1)])
    a1 = greedy(model, tok, p1)
    p2 = chat_prompt(tok, [user(q1), assistant(a1), user(q2)])
    p3 = chat_prompt(tok, [system, user(q3)])
    p4 = chat_prompt(tok, [system, user(q4)])
    assert logged_prompts(err) == [p1, p2, p3, p4]
    assert p1.split("<|im_start|>assistant")[0] in p2 and a1 + "<|im_end|>" in p2  # history
    assert q1 not in p3 and "Be brief." in p3  # /system set the system turn and reset
    assert q3 not in p4 and "Be brief." in p4  # /reset kept the system turn
    answers = [greedy(model, tok, p) for p in (p1, p2, p3, p4)]
    assert out == "".join(a + "\n" for a in answers)
    assert "(system turn set; history cleared)" in err and "(history cleared)" in err


def test_end_of_input_exits_0_and_ctrl_c_at_the_prompt_exits_130(tiny_adapter, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))  # no /exit: EOF ends the chat
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--max-new-tokens", "4"]) == 0
    capsys.readouterr()

    def ctrl_c(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", ctrl_c)
    assert llama_chat.main(["--adapter-path", str(tiny_adapter)]) == 130
    err = capsys.readouterr().err
    assert "error: interrupted (Ctrl-C)" in err and "Traceback" not in err


def test_ctrl_c_during_an_answer_stops_it_and_drops_the_exchange(tiny_adapter, capsys,
                                                                  monkeypatch):
    def ctrl_c(self, chunk):
        raise KeyboardInterrupt  # as Ctrl-C arrives while an answer streams

    monkeypatch.setattr(TrimmedWriter, "write", ctrl_c)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Interrupted question\nNext question\n"))
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--max-new-tokens", "900",
                            "-v"]) == 0
    err = capsys.readouterr().err
    assert err.count("(interrupted: this exchange is not kept)") == 2
    prompts = logged_prompts(err)
    assert len(prompts) == 2 and "Interrupted question" not in prompts[1]
    # the generation itself stopped within a few tokens (the tiny model never ends on its own)
    chat = load_chat_model(ChatArgs(adapter_path=str(tiny_adapter)))
    _, ids = fit_prompt(chat, Conversation(), QUESTION, 900)
    answer = stream_answer(chat, ids, ChatArgs(max_new_tokens=900), io.StringIO())
    assert answer.interrupted and answer.new_tokens < 100


def test_history_beyond_the_context_drops_the_earliest_exchanges(tiny_adapter, tuned, capsys,
                                                                 monkeypatch):
    model, tok = tuned
    system = {"role": "system", "content": "You are terse."}
    q1, q2, q3 = "Alpha question?", "Beta question?", "Gamma question?"
    a1 = greedy(model, tok, chat_prompt(tok, [system, user(q1)]))
    a2 = greedy(model, tok, chat_prompt(tok, [system, user(q1), assistant(a1), user(q2)]))
    whole = chat_prompt(tok, [system, user(q1), assistant(a1), user(q2), assistant(a2), user(q3)])
    # one token short of room for the whole history and the answer
    context = len(tok(whole, add_special_tokens=False)["input_ids"]) + NEW - 1
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{q1}\n{q2}\n{q3}\n"))
    assert llama_chat.main(["--adapter-path", str(tiny_adapter), "--system", system["content"],
                            "--max-new-tokens", str(NEW), "--context-length", str(context),
                            "-v"]) == 0
    err = capsys.readouterr().err
    assert logged_prompts(err)[-1] == chat_prompt(tok, [system, user(q2), assistant(a2),
                                                        user(q3)])
    assert f"dropped the 1 earliest exchange(s) to fit the context of {context} tokens" in err


# ---------------------------------------------------------------------------------------------
# End to end on the embedded model
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prompt_on_the_embedded_model_in_a_process(embedded_model_dir):
    import torch

    question = "What is the capital of France?"
    proc = subprocess.run([sys.executable, "llama_chat.py", "--model-size", "135m", "--prompt",
                           question, "--max-new-tokens", "24"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, tok, _ = load_for_inference(model_size="135m", dtype=torch.float32)
    expected = greedy(model, tok, chat_prompt(tok, [user(question)]), max_new_tokens=24)
    assert proc.stdout == expected + "\n"
    assert "Paris" in proc.stdout


TMUX = shutil.which("tmux")


def _pane(socket: str) -> str:
    return subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-t", "chat"],
                          capture_output=True, text=True).stdout


def _wait_for(socket: str, ready, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    pane = ""
    while time.monotonic() < deadline:
        pane = _pane(socket)
        if ready(pane):
            return pane
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s; the pane shows:\n{pane}")


def _session_alive(socket: str) -> bool:
    return subprocess.run(["tmux", "-L", socket, "has-session", "-t", "chat"],
                          capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_interactive_chat_in_a_real_terminal(embedded_model_dir, tmp_path):
    socket, rc_file = f"llama-chat-test-{tmp_path.name}", tmp_path / "rc"
    question = "What is the capital of France?"
    command = (f"cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} llama_chat.py "
               f"--model-size 135m --max-new-tokens 24; echo $? > {shlex.quote(str(rc_file))}")
    subprocess.run(["tmux", "-L", socket, "new-session", "-d", "-s", "chat", "-x", "200", "-y",
                    "50", command], check=True)
    try:
        _wait_for(socket, lambda p: p.rstrip().endswith(">>>"), 60)
        subprocess.run(["tmux", "-L", socket, "send-keys", "-t", "chat", question, "Enter"],
                       check=True)
        pane = _wait_for(socket, lambda p: f">>> {question}" in p
                         and p.split(f">>> {question}", 1)[1].rstrip().endswith(">>>"), 60)
        answer = pane.split(f">>> {question}", 1)[1].rstrip()[: -len(">>>")].strip()
        assert "Paris" in answer, pane
        subprocess.run(["tmux", "-L", socket, "send-keys", "-t", "chat", "/exit", "Enter"],
                       check=True)
        deadline = time.monotonic() + 20
        while _session_alive(socket) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not _session_alive(socket), _pane(socket)  # the session ended with the process
        assert rc_file.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
