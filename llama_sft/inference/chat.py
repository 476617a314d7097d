"""The chat of `python3 llama_chat.py`: load what to chat with, keep the conversation in the
training prompt format, stream each answer, and the two modes (one --prompt, or interactive).

    python3 llama_chat.py --adapter-path ./training_output/final_model
    python3 llama_chat.py --adapter-path ./packages/NAME.tar.gz --prompt "List three colors."

Phases: check_chat_config -> load_chat_model (an adapter folder, a package archive checked and
extracted as `llama_package.py --verify` does, a merged model folder, or a base model) ->
answer_once or chat_loop, each turn fit_prompt (history rendered with render_conversation,
earliest exchanges dropped to fit the context) then stream_answer (model.generate in a thread
feeding a TextIteratorStreamer; Ctrl-C stops it at the next token).

Answers go to stdout, everything else (logs, notices, verification lines) to stderr, so
`llama_chat.py --prompt ... > answer.txt` captures only the answer. Greedy answers equal
llama_sft.evaluation.generate.generate() on the same prompt: same ids, generation arguments,
stop tokens and decoding (the text stripped, up to the first stop token).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from llama_sft.config import ChatArgs, PackageArgs, raise_problems
from llama_sft.data.prompts import render_conversation, resolve_prompt_format
from llama_sft.errors import BadInput, ModelLoadError, PackageError, VerifyError
from llama_sft.evaluation.generate import generation_kwargs, run_stop_ids
from llama_sft.layout import ADAPTER_CONFIG, RUN_CONFIG, RunConfig, SchemaError
from llama_sft.modeling.load import inference_dtype, load_for_inference, resolve_base_model
from llama_sft.packaging.verify import (
    check_archive_file,
    check_sums,
    extract_checked,
    read_metadata,
)

logger = logging.getLogger("llama_sft")

PROMPT_MARK = ">>> "
COMMANDS = "/reset (clear the history), /system TEXT (set the system turn and reset), /exit"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


# ---------------------------------------------------------------------------------------------
# Configuration and loading
# ---------------------------------------------------------------------------------------------


def check_chat_config(cfg: ChatArgs) -> None:
    """Every problem with the flags at once (ConfigError, exit 2), before anything loads."""
    problems = []
    if cfg.adapter_path and cfg.model:
        problems.append("--adapter-path and --model exclude each other; pick one")
    if cfg.model and (cfg.base_model or cfg.model_size):
        problems.append("--model is a whole model; drop --base-model/--model-size")
    if not (cfg.adapter_path or cfg.model or cfg.base_model or cfg.model_size):
        problems.append("say what to chat with: --adapter-path ADAPTER_OR_ARCHIVE, --model "
                        "FOLDER, or a base model with --base-model / --model-size "
                        "(--model-size 135m: the embedded CPU model)")
    if cfg.do_sample and cfg.temperature <= 0:
        problems.append(f"--temperature must be > 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.context_length is not None and cfg.context_length < 16:
        problems.append(f"--context-length must be >= 16, got {cfg.context_length}")
    raise_problems(problems)


def read_prompt(prompt: str) -> str:
    """--prompt TEXT, or the whole of stdin for --prompt -; empty is bad input."""
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise BadInput("--prompt -: nothing on stdin" if prompt == "-" else "--prompt is empty")
    return text.strip()


def source_of(cfg: ChatArgs) -> tuple[str, Path] | None:
    """('adapter' | 'archive' | 'model', path) for --adapter-path / --model; None for a base
    model. A path that is missing, of the other flag's kind, or neither is bad input."""
    flag, value = (("--adapter-path", cfg.adapter_path) if cfg.adapter_path
                   else ("--model", cfg.model) if cfg.model else (None, None))
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        kind = "archive"
    elif path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        kind = "adapter"
    elif path.is_dir() and (path / "config.json").is_file():
        kind = "model"
    elif not path.exists():
        raise ModelLoadError(f"{flag} {value}: no such file or folder (an adapter is in "
                             "OUTPUT/final_model after llama_train.py; a package is written by "
                             "llama_package.py --output-dir ./packages)")
    else:
        raise ModelLoadError(f"{flag} {value}: neither an adapter folder (adapter_config.json), "
                             "a model folder (config.json) nor a package archive (.tar.gz)")
    if flag == "--adapter-path" and kind == "model":
        raise ModelLoadError(f"--adapter-path {value} is a model folder (config.json, no "
                             f"{ADAPTER_CONFIG}); pass it with --model")
    if flag == "--model" and kind != "model":
        what = "an adapter folder" if kind == "adapter" else "a package archive"
        raise ModelLoadError(f"--model {value} is {what}; pass it with --adapter-path")
    return kind, path


def open_package(archive: Path) -> tuple[Path, Path]:
    """(temporary folder, package folder): the archive checked as `llama_package.py --verify`
    does before anything is loaded (its sha256 against NAME.tar.gz.sha256 when present, every
    member safe, SHA256SUMS and metadata.json). A failed check is bad input here: exit 2."""
    logger.info("checking and extracting %s", archive)
    dest = None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # verify's progress lines are logs here
            check_archive_file(archive)
            dest, top, _ = extract_checked(PackageArgs(verify=str(archive)), archive)
            read_metadata(dest / top, check_sums(archive, dest / top))
    except BaseException as e:
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        if isinstance(e, VerifyError):
            raise PackageError(f"--adapter-path {archive}: refused, verification failed: {e} "
                               "(nothing was loaded)") from None
        raise
    return dest, dest / top


@dataclass
class ChatModel:
    """What a conversation runs on: the model, its tokenizer and how to prompt and stop it."""

    model: Any
    tokenizer: Any
    prompt_format: str
    stop_ids: list[int]
    context_length: int
    description: str


def _run_config_of(folder: Path) -> RunConfig:
    """A merged model folder's run_config.json when it has one, else an empty RunConfig."""
    if not (folder / RUN_CONFIG).is_file():
        return RunConfig()
    try:
        return RunConfig.from_json(folder / RUN_CONFIG)
    except SchemaError as e:
        raise ModelLoadError(f"{folder / RUN_CONFIG}: {e}") from None


def _load(cfg: ChatArgs, *, adapter: str | None, model_dir: Path | None,
          description: str) -> ChatModel:
    from safetensors import SafetensorError

    logger.info("loading %s", description)
    try:
        model, tok, run_cfg = load_for_inference(
            adapter_path=adapter, base_model=str(model_dir) if model_dir else cfg.base_model,
            model_size=cfg.model_size, use_4bit=cfg.use_4bit, use_8bit=cfg.use_8bit,
            trust_remote_code=cfg.trust_remote_code, dtype=inference_dtype(cfg.dtype))
    except ModelLoadError:
        raise
    except (RuntimeError, ValueError, KeyError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelLoadError(f"could not load {description}: {first}") from None
    run = _run_config_of(model_dir) if model_dir else RunConfig.from_dict(run_cfg)
    fmt = resolve_prompt_format(tok, cfg.prompt_format or run.prompt_format or "auto")
    stop_ids = run_stop_ids(run, fmt, model, tok)
    limit = (cfg.context_length or getattr(model.config, "max_position_embeddings", None)
             or run.max_length or 2048)
    return ChatModel(model=model, tokenizer=tok, prompt_format=fmt, stop_ids=stop_ids,
                     context_length=int(limit), description=description)


def load_chat_model(cfg: ChatArgs) -> ChatModel:
    """The model to chat with, from --adapter-path (folder or archive), --model, or a base model
    (--base-model / --model-size). An archive's temporary folder is removed once loaded."""
    source = source_of(cfg)
    if source is None:
        name = resolve_base_model(cfg.model_size, cfg.base_model)
        return _load(cfg, adapter=None, model_dir=None, description=f"base model {name}")
    kind, path = source
    if kind == "model":
        return _load(cfg, adapter=None, model_dir=path, description=f"model {path}")
    if kind == "adapter":
        return _load(cfg, adapter=str(path), model_dir=None, description=f"adapter {path}")
    tmp, folder = open_package(path)
    try:
        return _load(cfg, adapter=str(folder), model_dir=None, description=f"package {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The conversation
# ---------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """An optional system turn and the (user, assistant) exchanges so far."""

    system: str | None = None
    exchanges: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, user: str, exchanges: list[tuple[str, str]] | None = None
                 ) -> list[dict[str, str]]:
        """Chat messages: the system turn, the exchanges, then `user`."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.exchanges if exchanges is None else exchanges:
            msgs += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
        return msgs + [{"role": "user", "content": user}]


def fit_prompt(chat: ChatModel, conv: Conversation, user: str,
               max_new_tokens: int) -> tuple[str, list[int]]:
    """(rendered prompt, its token ids) for `user` after the history, as training renders a
    conversation. While prompt + max_new_tokens exceed the context, the earliest exchange is
    dropped for good (the system turn stays); BadInput when the message alone does not fit."""
    kept = list(conv.exchanges)
    while True:
        text = render_conversation(chat.tokenizer, chat.prompt_format, conv.messages(user, kept),
                                   add_generation_prompt=True)
        ids = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + max_new_tokens <= chat.context_length:
            break
        if not kept:
            raise BadInput(f"the message is {len(ids)} tokens as a prompt; with --max-new-tokens "
                           f"{max_new_tokens} it does not fit the context of "
                           f"{chat.context_length} tokens: shorten it or lower --max-new-tokens")
        kept.pop(0)
    if len(kept) < len(conv.exchanges):
        logger.info("dropped the %d earliest exchange(s) to fit the context of %d tokens",
                    len(conv.exchanges) - len(kept), chat.context_length)
        conv.exchanges = kept
    logger.debug("prompt (%d tokens): %s", len(ids), json.dumps(text, ensure_ascii=False))
    return text, ids


# ---------------------------------------------------------------------------------------------
# Streamed generation
# ---------------------------------------------------------------------------------------------


class StopFlag:
    """A stopping criterion for model.generate: stop every row once `event` is set (Ctrl-C)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class TrimmedWriter:
    """Writes streamed text as generate()'s `.strip()` leaves it: leading whitespace dropped,
    trailing whitespace held back until more text follows it."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.started, self.pending = out, False, ""

    def write(self, chunk: str) -> None:
        text = self.pending + chunk
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.pending = text[len(body):]
        if body:
            self.out.write(body)
            self.out.flush()
            self.started = True


@dataclass
class Answer:
    text: str  # as generate() returns it: up to the first stop token, stripped
    new_tokens: int
    ended_with_eos: bool
    interrupted: bool = False


def _generate_into(model, kwargs: dict[str, Any], streamer, result: dict[str, Any]) -> None:
    """The generation thread: the output, or the error for the main thread to raise."""
    try:
        result["output"] = model.generate(**kwargs)
    except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
        result["error"] = e
        streamer.end()  # unblock the main thread's iteration


def _decode(tokenizer, new_ids: list[int], stop_ids: list[int]) -> tuple[str, int, bool]:
    """(text, new tokens, ended at a stop token), decoded as generate() decodes a row."""
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(new_ids) if t in stops), None)
    toks = new_ids if end is None else new_ids[:end]
    text = tokenizer.decode(toks, skip_special_tokens=True).strip()
    return text, len(toks) + int(end is not None), end is not None


def stream_answer(chat: ChatModel, prompt_ids: list[int], cfg: ChatArgs, out: TextIO) -> Answer:
    """Generate from `prompt_ids` in a thread and write the text to `out` as it comes; Ctrl-C
    stops the generation at the next token (the Answer says it was interrupted)."""
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    tok = chat.tokenizer
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    ids = torch.tensor([prompt_ids], device=next(chat.model.parameters()).device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else chat.stop_ids[0]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([StopFlag(stop)]),
                  **generation_kwargs(max_new_tokens=cfg.max_new_tokens,
                                       do_sample=cfg.do_sample, temperature=cfg.temperature,
                                       top_p=cfg.top_p, pad=pad, stop_ids=chat.stop_ids))
    result: dict[str, Any] = {}
    thread = threading.Thread(target=_generate_into, args=(chat.model, kwargs, streamer, result),
                              daemon=True)
    writer, interrupted = TrimmedWriter(out), False
    thread.start()
    try:
        for chunk in streamer:
            writer.write(chunk)
    except KeyboardInterrupt:
        stop.set()
        interrupted = True
    thread.join()
    if "error" in result:
        raise result["error"]
    new_ids = result["output"][0, len(prompt_ids):].tolist()
    text, new_tokens, ended = _decode(tok, new_ids, chat.stop_ids)
    return Answer(text=text, new_tokens=new_tokens, ended_with_eos=ended, interrupted=interrupted)


# ---------------------------------------------------------------------------------------------
# The two modes
# ---------------------------------------------------------------------------------------------


def answer_once(chat: ChatModel, cfg: ChatArgs, message: str) -> Answer:
    """--prompt: the answer on stdout, one line break after it; Ctrl-C exits 130."""
    _, ids = fit_prompt(chat, Conversation(system=cfg.system), message, cfg.max_new_tokens)
    answer = stream_answer(chat, ids, cfg, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if answer.interrupted:
        raise KeyboardInterrupt
    return answer


def apply_command(line: str, conv: Conversation) -> str:
    """'exit', 'done' (a /command was applied) or 'message' (send the line to the model)."""
    command, _, arg = line.strip().partition(" ")
    if command in ("/exit", "/quit"):
        return "exit"
    if command == "/reset":
        conv.exchanges = []
        print("(history cleared)", file=sys.stderr)
    elif command == "/system":
        conv.system, conv.exchanges = arg.strip() or None, []
        print(f"(system turn {'set' if conv.system else 'removed'}; history cleared)",
              file=sys.stderr)
    elif command.startswith("/"):
        print(f"unknown command {command}; commands: {COMMANDS}", file=sys.stderr)
    else:
        return "message"
    return "done"


def chat_turn(chat: ChatModel, cfg: ChatArgs, conv: Conversation, message: str,
              separator: str) -> bool:
    """One exchange: fit, stream, keep it in the history. False when it was not kept (too
    long for the context, or interrupted by Ctrl-C)."""
    try:
        _, ids = fit_prompt(chat, conv, message, cfg.max_new_tokens)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    answer = stream_answer(chat, ids, cfg, sys.stdout)
    sys.stdout.write(separator)
    sys.stdout.flush()
    if answer.interrupted:
        print("(interrupted: this exchange is not kept)", file=sys.stderr)
        return False
    conv.exchanges.append((message, answer.text))
    return True


def chat_loop(chat: ChatModel, cfg: ChatArgs) -> int:
    """Read messages until /exit or end of input (Ctrl-D); returns the exchanges kept. Ctrl-C
    at the prompt raises KeyboardInterrupt (exit 130); during an answer it stops the answer."""
    conv = Conversation(system=cfg.system)
    tty = sys.stdin.isatty()
    if tty:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
    logger.info("chatting with %s (%s prompt format, context %d tokens); commands: %s; "
                "Ctrl-D exits", chat.description, chat.prompt_format, chat.context_length,
                COMMANDS)
    kept = 0
    while True:
        try:
            line = input(PROMPT_MARK if tty else "")
        except EOFError:
            if tty:
                print()
            return kept
        except KeyboardInterrupt:
            print()
            raise
        action = apply_command(line, conv) if line.strip() else "done"
        if action == "exit":
            return kept
        if action == "message":
            kept += chat_turn(chat, cfg, conv, line.strip(), "\n\n" if tty else "\n")


def run_chat(cfg: ChatArgs) -> dict[str, Any]:
    """Check the flags, load the model, then answer --prompt once or chat; returns what was
    done (mode, exchanges, and for --prompt the answer)."""
    check_chat_config(cfg)
    message = read_prompt(cfg.prompt) if cfg.prompt is not None else None
    chat = load_chat_model(cfg)
    if cfg.do_sample:
        import torch

        torch.manual_seed(cfg.seed)
    if message is not None:
        answer = answer_once(chat, cfg, message)
        return {"mode": "prompt", "exchanges": 1, "answer": answer.text,
                "new_tokens": answer.new_tokens, "ended_with_eos": answer.ended_with_eos}
    return {"mode": "interactive", "exchanges": chat_loop(chat, cfg)}
