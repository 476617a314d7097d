"""An Ollama Modelfile for a GGUF export: `FROM ./<file>.gguf`, a TEMPLATE that renders
conversations exactly as the adapter was trained, one `PARAMETER stop` per stop token and the
SYSTEM prompt a chat template inserts by default.

    ollama create NAME -f Modelfile && ollama run NAME

The TEMPLATE is an Ollama Go template over `.Messages` (each `.Role` / `.Content`) and `.System`.
Ollama puts the Modelfile's SYSTEM first in `.Messages` when a chat has no system message, and
collects every system message into `.System` (ollama template/template.go `collate`,
server/routes.go). Four prompt shapes are known: ChatML (SmolLM2, Qwen), Llama 3 (header tokens,
<|eot_id|>), Llama 2 chat ([INST], <<SYS>>) and the toolkit's instruction template
(data/prompts.py). `detect_shape` reads the shape off the tokenizer's own renders and accepts it
only when a Python rendering of the shape reproduces the chat template on probe conversations;
an unknown template gets a Modelfile without TEMPLATE (Ollama then guesses from the GGUF).

llama.cpp adds the BOS token itself when the GGUF says so (tokenizer.ggml.add_bos_token, taken
from the same tokenizer config), so a leading BOS is left out of TEMPLATE exactly when the
tokenizer adds one on encoding. Message contents are not trimmed (Go templates have no trim).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llama_sft.data.prompts import render_conversation, resolve_prompt_format, stop_token_ids
from llama_sft.errors import PackageError
from llama_sft.layout import RunConfig

logger = logging.getLogger("llama_sft")

MODELFILE = "Modelfile"

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
L3_HEADER, L3_END_HEADER, L3_EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

# Contents for the probe conversations: plain words, no surrounding whitespace (Llama 3 trims).
_SYSTEM, _USERS, _ANSWERS = "Probe system", ("Probe one", "Probe two"), ("Answer one",)


@dataclass(frozen=True)
class PromptShape:
    """A prompt format Ollama can reproduce. prefix: what the format writes before the first
    turn (a BOS, or nothing); bos/eos: the token texts it writes between turns."""

    name: str  # "chatml", "llama3", "llama2" or "instruction"
    prefix: str = ""
    bos: str = ""
    eos: str = ""
    default_system: str | None = None  # ChatML: the system turn written when none is given
    system_preamble: str | None = None  # Llama 3.1: the system block is always there, this first


def probe_conversations() -> list[list[dict[str, str]]]:
    """Single- and multi-turn conversations, each with and without a system turn, ending with a
    user turn (what a generation prompt renders)."""
    single = [{"role": "user", "content": _USERS[0]}]
    multi = single + [{"role": "assistant", "content": _ANSWERS[0]},
                      {"role": "user", "content": _USERS[1]}]
    system = [{"role": "system", "content": _SYSTEM}]
    return [single, system + single, multi, system + multi]


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"] if bos is not None else []
    return bool(ids) and ids[0] == bos


# ----------------------------------------------------------------------------- shape detection
def _chatml_shape(tokenizer, first: str) -> PromptShape:
    prefix = first[:first.index(IM_START)]
    rest, default = first[len(prefix):], None
    head = f"{IM_START}system\n"
    if rest.startswith(head):
        default = rest[len(head):rest.index(IM_END)]
    return PromptShape("chatml", prefix=prefix, default_system=default)


def _llama3_shape(tokenizer, first: str) -> PromptShape:
    prefix = first[:first.index(L3_HEADER)]
    rest, preamble = first[len(prefix):], None
    head = f"{L3_HEADER}system{L3_END_HEADER}\n\n"
    if rest.startswith(head):
        preamble = rest[len(head):rest.index(L3_EOT)]
    return PromptShape("llama3", prefix=prefix, system_preamble=preamble)


def _llama2_shape(tokenizer, first: str) -> PromptShape:
    bos = first[:first.index("[INST]")]
    return PromptShape("llama2", prefix=bos, bos=bos, eos=tokenizer.eos_token or "")


def detect_shape(tokenizer, prompt_format: str) -> PromptShape | None:
    """The shape of the training prompts, or None when the chat template is none of the known
    ones (or renders differently from its shape on any probe conversation)."""
    if prompt_format != "chat":
        return PromptShape("instruction", prefix=tokenizer.bos_token or "",
                           eos=tokenizer.eos_token or "")
    first = render_conversation(tokenizer, "chat", probe_conversations()[0],
                                add_generation_prompt=True)
    if IM_START in first:
        shape = _chatml_shape(tokenizer, first)
    elif L3_HEADER in first:
        shape = _llama3_shape(tokenizer, first)
    elif "[INST]" in first:
        shape = _llama2_shape(tokenizer, first)
    else:
        return None
    for messages in probe_conversations():
        expected = render_conversation(tokenizer, "chat", messages, add_generation_prompt=True)
        if render_shape(shape, messages) != expected:
            logger.warning("the chat template looks like %s but renders differently; the "
                           "Modelfile gets no TEMPLATE", shape.name)
            return None
    return shape


# ------------------------------------------------------- the Python rendering of each shape
def _render_chatml(shape: PromptShape, messages: Sequence[dict[str, str]]) -> list[str]:
    out = []
    if shape.default_system is not None and messages[0]["role"] != "system":
        out.append(f"{IM_START}system\n{shape.default_system}{IM_END}\n")
    out += [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    return out + [f"{IM_START}assistant\n"]


def _render_llama3(shape: PromptShape, messages: Sequence[dict[str, str]]) -> list[str]:
    out, turns = [], list(messages)
    if shape.system_preamble is not None:
        system = turns.pop(0)["content"] if turns[0]["role"] == "system" else ""
        out.append(f"{L3_HEADER}system{L3_END_HEADER}\n\n{shape.system_preamble}{system}{L3_EOT}")
    out += [f"{L3_HEADER}{m['role']}{L3_END_HEADER}\n\n{m['content']}{L3_EOT}" for m in turns]
    return out + [f"{L3_HEADER}assistant{L3_END_HEADER}\n\n"]


def _render_llama2(shape: PromptShape, messages: Sequence[dict[str, str]]) -> list[str]:
    out, turns = [], list(messages)
    system = turns.pop(0)["content"] if turns[0]["role"] == "system" else None
    for i, m in enumerate(turns):
        if m["role"] == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 and system else ""
            out.append(f"{shape.bos if i else ''}[INST] {sys_block}{m['content']} [/INST]")
        else:
            out.append(f" {m['content']} {shape.eos}")
    return out


def render_shape(shape: PromptShape, messages: Sequence[dict[str, str]]) -> str:
    """A conversation (ending with a user turn) as the shape renders its generation prompt,
    BOS included; instruction-shape rendering is data/prompts.py's own."""
    if shape.name == "instruction":
        raise ValueError("the instruction shape renders with data/prompts.render_conversation")
    render = {"chatml": _render_chatml, "llama3": _render_llama3, "llama2": _render_llama2}
    return shape.prefix + "".join(render[shape.name](shape, messages))


# ------------------------------------------------------------------------ the Go templates
def _last_test() -> str:
    """True inside `range $i, $_ := .Messages` unless the message is the last one."""
    return "ne (len (slice $.Messages $i)) 1"


def _go_chatml(shape: PromptShape) -> str:
    default = ""
    if shape.default_system is not None:
        default = (f"{{{{ if not .System }}}}{IM_START}system\n{shape.default_system}{IM_END}\n"
                   "{{ end }}")
    return (f"{default}{{{{ range .Messages }}}}{IM_START}{{{{ .Role }}}}\n{{{{ .Content }}}}"
            f"{IM_END}\n{{{{ end }}}}{IM_START}assistant\n")


def _go_llama3(shape: PromptShape) -> str:
    header = f"{L3_HEADER}{{{{ .Role }}}}{L3_END_HEADER}\n\n{{{{ .Content }}}}{L3_EOT}"
    tail = f"{L3_HEADER}assistant{L3_END_HEADER}\n\n"
    if shape.system_preamble is None:  # Llama 3.0: a system turn is one more message
        return f"{{{{ range .Messages }}}}{header}{{{{ end }}}}{tail}"
    return (f"{L3_HEADER}system{L3_END_HEADER}\n\n{shape.system_preamble}{{{{ .System }}}}{L3_EOT}"
            f'{{{{ range .Messages }}}}{{{{ if ne .Role "system" }}}}{header}{{{{ end }}}}'
            f"{{{{ end }}}}{tail}")


def _go_llama2(shape: PromptShape) -> str:
    # The system prompt goes into the first user turn: index 1 when Ollama put it first.
    system = "{{ if and $.System (eq $i 1) }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}"
    return ('{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}'
            f"[INST] {system}{{{{ .Content }}}} [/INST]"
            '{{ else if eq .Role "assistant" }}'
            f" {{{{ .Content }}}} {shape.eos}{{{{ if {_last_test()} }}}}{shape.bos}{{{{ end }}}}"
            "{{ end }}{{ end }}")


def _go_instruction(shape: PromptShape) -> str:
    return ('{{ range $i, $_ := .Messages }}{{ if eq .Role "system" }}### System:\n'
            '{{ .Content }}\n\n{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
            '### Response:\n{{ else if eq .Role "assistant" }}'
            f"{{{{ .Content }}}}{shape.eos}{{{{ if {_last_test()} }}}}\n\n{{{{ end }}}}"
            "{{ end }}{{ end }}")


def go_template(shape: PromptShape, *, runtime_adds_bos: bool) -> str:
    """The Ollama TEMPLATE for a shape; the leading BOS is left to the runtime when it adds one."""
    body = {"chatml": _go_chatml, "llama3": _go_llama3, "llama2": _go_llama2,
            "instruction": _go_instruction}[shape.name](shape)
    prefix = shape.prefix
    if runtime_adds_bos and prefix:
        prefix = ""
    return prefix + body


# ------------------------------------------------------------------------------ the Modelfile
def ollama_template(tokenizer, prompt_format: str) -> tuple[PromptShape, str] | None:
    """(shape, TEMPLATE text) for the training prompt format, or None for an unknown template."""
    shape = detect_shape(tokenizer, prompt_format)
    if shape is None:
        return None
    adds_bos = tokenizer_adds_bos(tokenizer)
    if adds_bos and shape.prefix != (tokenizer.bos_token or ""):
        logger.warning("the tokenizer adds %r when encoding but the %s prompt does not start "
                       "with it: llama.cpp will add it too", tokenizer.bos_token, shape.name)
    drop_bos = adds_bos and shape.prefix == tokenizer.bos_token
    return shape, go_template(shape, runtime_adds_bos=drop_bos)


def stop_strings(tokenizer, stop_ids: Sequence[int]) -> list[str]:
    """The text of each stop token (special tokens as written, e.g. <|im_end|>), no repeats."""
    out: list[str] = []
    for token_id in stop_ids:
        text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
        if text and text not in out:
            out.append(text)
    return out


def _quoted(keyword: str, value: str) -> str:
    """A Modelfile value as Ollama's parser reads it (parser/parser.go): \"\"\"...\"\"\" for anything
    with a newline or a quote, whose text is kept as is; it drops unprintable characters and
    cannot hold \"\"\" itself."""
    if '"""' in value or re.search(r"[\x00-\x08\x0b-\x1f\x7f]", value):
        raise PackageError(f"the {keyword} of the Modelfile would hold '\"\"\"' or a control "
                           "character, which Ollama's Modelfile syntax cannot express")
    if "\n" in value or '"' in value or value != value.strip():
        return f'"""{value}"""'
    return f'"{value}"'


def modelfile_text(tokenizer, prompt_format: str, stop_ids: Sequence[int], gguf_name: str, *,
                   system: str | None = None) -> str:
    """The Modelfile for `gguf_name` (beside it): FROM, TEMPLATE, SYSTEM, PARAMETER stop.
    `system` overrides the chat template's default system message."""
    found = ollama_template(tokenizer, prompt_format)
    lines = [f"# Ollama Modelfile for {gguf_name}, written by llama-sft.",
             f"#   ollama create NAME -f {MODELFILE}   (in this folder), then: ollama run NAME",
             f"FROM ./{gguf_name}"]
    if found is None:
        lines.insert(2, "# No TEMPLATE: the chat template is none of ChatML, Llama 3, Llama 2; "
                        "Ollama uses the one it finds in the GGUF.")
    else:
        shape, template = found
        lines.insert(2, f"# TEMPLATE renders the {shape.name} prompts the model was trained on; "
                        "the runtime adds the BOS token when the tokenizer does.")
        lines.append(f"TEMPLATE {_quoted('TEMPLATE', template)}")
        system = system if system is not None else shape.default_system
    if system:
        lines.append(f"SYSTEM {_quoted('SYSTEM', system)}")
    lines += [f"PARAMETER stop {_quoted('stop', s)}" for s in stop_strings(tokenizer, stop_ids)]
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, tokenizer,
                    run_config: RunConfig | dict[str, Any], *, system: str | None = None,
                    filename: str = MODELFILE) -> Path:
    """Write `folder`/`filename` (Modelfile; e.g. NAME.Modelfile beside a GGUF in a shared
    packages/ folder) for the GGUF file `gguf_name` in the same folder, in the prompt format and
    with the stop tokens of `run_config` (run_config.json's RunConfig)."""
    run = run_config if isinstance(run_config, RunConfig) else RunConfig.from_dict(run_config)
    if "/" in gguf_name or "\\" in gguf_name or not gguf_name.endswith(".gguf"):
        raise PackageError(f"{gguf_name!r}: the Modelfile names a .gguf file in its own folder")
    prompt_format = resolve_prompt_format(tokenizer, run.prompt_format or "auto")
    stop_ids = run.stop_token_ids or stop_token_ids(tokenizer, prompt_format)
    path = Path(folder) / filename
    text = modelfile_text(tokenizer, prompt_format, stop_ids, gguf_name, system=system)
    path.write_text(text.replace(f"-f {MODELFILE} ", f"-f {filename} ", 1), encoding="utf-8")
    return path
