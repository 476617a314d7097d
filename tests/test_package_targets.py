"""The package's serving targets: the Ollama Modelfile (its TEMPLATE, rendered here by a small
Go-template renderer the way Ollama feeds it, equals the training prompt for every template
shape), the vLLM rules (each one on a good adapter and on an adapter broken for it), and the
Hub model card's YAML header and usage commands."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers import make_adapter
from template_tokenizers import (
    CHATML_DEFAULT_SYSTEM,
    chatml_tokenizer,
    llama2_tokenizer,
    llama3_stop_ids,
    llama3_tokenizer,
    tiny_llama_for,
)

import llama_package
from llama_sft.config import PackageArgs
from llama_sft.data.prompts import render_conversation, stop_token_ids
from llama_sft.errors import PackageError
from llama_sft.packaging import package as package_module
from llama_sft.packaging.modelfile import (
    MODELFILE,
    detect_shape,
    modelfile_text,
    write_modelfile,
)
from llama_sft.packaging.package import run_package
from llama_sft.packaging.vllm_check import RULES, check_vllm_adapter, max_lora_rank_for

# ------------------------------------------------------------------------------------------------
# A Go text/template subset (what the generated templates use): text, {{ pipeline }}, if / else if
# / else / end, range [$i, $v :=] / end, fields (.A, $.A, $v.A), string and int literals, and the
# functions eq, ne, and, or, not, len, slice. {{- and -}} trim whitespace as in Go.
# ------------------------------------------------------------------------------------------------
_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)


def _lex(template: str) -> list[tuple[str, str]]:
    pieces: list[list] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        pieces += [["text", text], ["action", m.group(2)]]
        pos, trim_next = m.end(), bool(m.group(3))
    tail = template[pos:]
    pieces.append(["text", tail.lstrip() if trim_next else tail])
    return [(kind, body) for kind, body in pieces if kind == "action" or body]


def _block(pieces, i):
    """(nodes, next index, the else/end action that stopped the block or None)."""
    nodes = []
    while i < len(pieces):
        kind, body = pieces[i]
        i += 1
        word = body.split(None, 1)[0] if kind == "action" and body else ""
        if kind == "text":
            nodes.append(("text", body))
        elif word in ("end", "else"):
            return nodes, i, body
        elif word == "if":
            node, i = _if(pieces, i, body[2:].strip())
            nodes.append(node)
        elif word == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w*)\s*(?:,\s*(\$\w*))?\s*:=\s*)?(.+)", body, re.S)
            inner, i, term = _block(pieces, i)
            assert term == "end", f"range without end: {term!r}"
            nodes.append(("range", m.group(1), m.group(2), m.group(3), inner))
        else:
            nodes.append(("out", body))
    return nodes, i, None


def _if(pieces, i, cond):
    branches, otherwise = [], []
    while True:
        inner, i, term = _block(pieces, i)
        branches.append((cond, inner))
        if term == "end":
            return ("if", branches, otherwise), i
        if term.startswith("else if "):
            cond = term[len("else if "):].strip()
            continue
        assert term == "else", f"unexpected {term!r}"
        otherwise, i, term = _block(pieces, i)
        assert term == "end"
        return ("if", branches, otherwise), i


def _tokens(expr: str) -> list[str]:
    return re.findall(r'\(|\)|"(?:\\.|[^"\\])*"|[^\s()]+', expr)


def _command(tokens, pos):
    args = []
    while pos < len(tokens) and tokens[pos] != ")":
        if tokens[pos] == "(":
            sub, pos = _command(tokens, pos + 1)
            args.append(("cmd", sub))
            pos += 1  # the ")"
        else:
            args.append(("tok", tokens[pos]))
            pos += 1
    return args, pos


def _truth(v) -> bool:
    return bool(v)


def _and(*args):
    for a in args:
        if not _truth(a):
            return a
    return args[-1]


def _or(*args):
    for a in args:
        if _truth(a):
            return a
    return args[-1]


GO_FUNCS = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b,
            "and": _and, "or": _or, "not": lambda a: not _truth(a), "len": len,
            "slice": lambda a, *ix: a[ix[0]:] if len(ix) == 1 else a[ix[0]:ix[1]]}


def _field(value, path: str):
    for name in [p for p in path.split(".") if p]:
        value = value[name]  # a missing key is a bug in the template: KeyError
    return value


def _operand(op, scope):
    kind, tok = op
    if kind == "cmd":
        return _call(tok, scope)
    if tok.startswith('"'):
        return json.loads(tok)
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok in ("true", "false"):
        return tok == "true"
    if tok.startswith("."):
        return _field(scope["."], tok)
    if tok.startswith("$"):
        name, _, path = tok.partition(".")
        return _field(scope["$"] if name == "$" else scope[name], path)
    raise ValueError(f"unsupported operand {tok!r}")


def _call(args, scope):
    kind, tok = args[0]
    if kind == "tok" and tok in GO_FUNCS:
        return GO_FUNCS[tok](*[_operand(a, scope) for a in args[1:]])
    assert len(args) == 1, f"not a function: {tok!r}"
    return _operand(args[0], scope)


def _eval(expr: str, scope):
    args, _ = _command(_tokens(expr), 0)
    return _call(args, scope)


def _run(nodes, scope, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_eval(node[1], scope)))
        elif node[0] == "if":
            for cond, inner in node[1]:
                if _truth(_eval(cond, scope)):
                    _run(inner, scope, out)
                    break
            else:
                _run(node[2], scope, out)
        else:
            _, index_var, value_var, expr, inner = node
            for i, item in enumerate(_eval(expr, scope)):
                local = {**scope, ".": item}
                if index_var and value_var:
                    local.update({index_var: i, value_var: item})
                elif index_var:
                    local[index_var] = item
                _run(inner, local, out)


def render_go(template: str, data: dict) -> str:
    nodes, _, term = _block(_lex(template), 0)
    assert term is None, f"stray {term!r}"
    out: list[str] = []
    _run(nodes, {".": data, "$": data}, out)
    return "".join(out)


def test_go_renderer_handles_the_constructs_it_claims():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}],
            "System": ""}
    tpl = ('{{- range $i, $_ := .Messages }}[{{ $i }}{{ .Role }}'
           '{{ if eq .Role "user" }}U{{ else if eq .Role "x" }}X{{ else }}O{{ end }}'
           '{{ if ne (len (slice $.Messages $i)) 1 }},{{ end }}]{{ end }}'
           '{{ if and $.System true }}S{{ end }}{{ if or $.System (not $.System) }}!{{ end }}  \n'
           '{{- " end" }}')
    assert render_go(tpl, data) == "[0userU,][1assistantO]! end"


# ------------------------------------------------------------------------------------------------
# Ollama: its Modelfile syntax, how it builds .System / .Messages, and its runtime BOS
# ------------------------------------------------------------------------------------------------
def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and PARAMETER stop values, read as Ollama's parser/parser.go does
    for the quoting the generator writes: \"\"\"...\"\"\" (kept verbatim) or "..." on one line."""
    out: dict = {"stop": []}
    pos = 0
    while pos < len(text):
        line_end = text.find("\n", pos)
        line_end = len(text) if line_end < 0 else line_end
        line = text[pos:line_end]
        if not line.strip() or line.startswith("#"):
            pos = line_end + 1
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "PARAMETER":
            name, _, rest = rest.partition(" ")
            keyword = name
        start = pos + line.index(rest)
        if rest.startswith('"""'):
            close = text.index('"""', start + 3)
            value, pos = text[start + 3:close], close + 4
        else:
            value, pos = (rest[1:-1] if rest.startswith('"') else rest), line_end + 1
        if keyword == "stop":
            out["stop"].append(value)
        else:
            out[keyword.lower()] = value
    return out


def ollama_prompt(modelfile: dict, messages, tokenizer, *, use_system: bool = True) -> str:
    """The text the model gets from Ollama's chat endpoint: the Modelfile SYSTEM first when the
    chat has no system message (server/routes.go), messages collated (template/template.go), the
    TEMPLATE executed, and the BOS the runtime adds (when the tokenizer adds one)."""
    msgs = [dict(m) for m in messages]
    if use_system and modelfile.get("system") and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": modelfile["system"]})
    collated: list[dict] = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    data = {"System": system, "Messages": collated, "Tools": None, "Response": ""}
    adds_bos = tokenizer.bos_token_id is not None and \
        tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return (tokenizer.bos_token if adds_bos else "") + render_go(modelfile["template"], data)


SYSTEM = "You are a terse assistant."
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 + 3?"}],
    "single_system": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "What is 2 + 3?"}],
    "multi": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
              {"role": "user", "content": "Now double it."}],
    "multi_system": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": "What is 2 + 3?"},
                     {"role": "assistant", "content": "5"},
                     {"role": "user", "content": "Now double it."},
                     {"role": "assistant", "content": "10"},
                     {"role": "user", "content": "Say that in one word."}],
}

# Meta-Llama-3-8B-Instruct's template: no system block unless a system message is given.
LLAMA30_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


def _llama30():
    tok = llama3_tokenizer()
    tok.chat_template = LLAMA30_TEMPLATE
    return tok


def _llama2_base():
    tok = llama2_tokenizer()
    tok.chat_template = None
    return tok


# name -> (tokenizer factory, prompt format, shape, runtime adds BOS)
SHAPES = {
    "chatml": (chatml_tokenizer, "chat", "chatml", False),
    "llama3.1": (llama3_tokenizer, "chat", "llama3", True),
    "llama3.0": (_llama30, "chat", "llama3", True),
    "llama2-chat": (llama2_tokenizer, "chat", "llama2", True),
    "instruction-llama2-base": (_llama2_base, "instruction", "instruction", True),
    "instruction-chatml-tokenizer": (chatml_tokenizer, "instruction", "instruction", False),
}


def _modelfile_for(tok, fmt: str) -> dict:
    text = modelfile_text(tok, fmt, stop_token_ids(tok, fmt), "model.gguf")
    assert text.splitlines()[3] == "FROM ./model.gguf"
    return parse_modelfile(text)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", sorted(SHAPES))
def test_modelfile_template_renders_the_training_prompt(family, conversation):
    factory, fmt, shape, adds_bos = SHAPES[family]
    tok = factory()
    assert detect_shape(tok, fmt).name == shape
    assert (tok("a")["input_ids"][:1] == [tok.bos_token_id]) is adds_bos
    modelfile = _modelfile_for(tok, fmt)
    messages = CONVERSATIONS[conversation]
    expected = render_conversation(tok, fmt, messages, add_generation_prompt=True)
    assert ollama_prompt(modelfile, messages, tok) == expected
    if adds_bos:  # the runtime's BOS is not written twice
        assert not modelfile["template"].startswith(tok.bos_token)


@pytest.mark.parametrize("family", ["llama2-chat", "instruction-llama2-base"])
def test_turn_separators_only_between_turns(family):
    """Llama 2 writes <s> and the instruction template a blank line only before a next turn: a
    conversation that ends with the assistant (Ollama's prefill) ends with its EOS."""
    factory, fmt, _, _ = SHAPES[family]
    tok = factory()
    messages = CONVERSATIONS["multi_system"] + [{"role": "assistant", "content": "Ten"}]
    rendered = ollama_prompt(_modelfile_for(tok, fmt), messages, tok)
    assert rendered == render_conversation(tok, fmt, messages)
    assert rendered.endswith(" Ten </s>" if fmt == "chat" else "\n### Response:\nTen</s>")


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_modelfile_of_the_embedded_tokenizer(tokenizer, conversation):
    modelfile = _modelfile_for(tokenizer, "chat")
    messages = CONVERSATIONS[conversation]
    assert ollama_prompt(modelfile, messages, tokenizer) == render_conversation(
        tokenizer, "chat", messages, add_generation_prompt=True)


def test_chatml_default_system_is_the_system_line_and_survives_without_it():
    tok = chatml_tokenizer()
    modelfile = _modelfile_for(tok, "chat")
    assert modelfile["system"] == CHATML_DEFAULT_SYSTEM
    assert modelfile["stop"] == ["<|im_end|>"]
    # a client that sends no system message and clears SYSTEM still gets the template's default
    messages = CONVERSATIONS["multi"]
    assert ollama_prompt(modelfile, messages, tok, use_system=False) == render_conversation(
        tok, "chat", messages, add_generation_prompt=True)


def test_llama3_modelfile_stops_and_no_system():
    tok = llama3_tokenizer()
    text = modelfile_text(tok, "chat", llama3_stop_ids(tok), "m.gguf")
    parsed = parse_modelfile(text)
    assert parsed["stop"] == ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
    assert "system" not in parsed and "SYSTEM" not in text
    assert parsed["template"].startswith("<|start_header_id|>system<|end_header_id|>")


def test_write_modelfile_uses_the_run_config(tmp_path):
    tok = llama3_tokenizer()
    run_config = {"prompt_format": "chat", "stop_token_ids": llama3_stop_ids(tok)[2:]}
    path = write_modelfile(tmp_path, "adapter-merged.Q8_0.gguf", tok, run_config)
    assert path == tmp_path / MODELFILE
    parsed = parse_modelfile(path.read_text())
    assert parsed["from"] == "./adapter-merged.Q8_0.gguf" and parsed["stop"] == ["<|eot_id|>"]
    # without stop ids recorded (older run configs), the ones the prompt format implies
    parsed = parse_modelfile(write_modelfile(tmp_path, "m.gguf", tok, {}).read_text())
    assert parsed["stop"] == ["<|eot_id|>"]
    # beside the archive in a shared packages/ folder: one Modelfile per package
    named = write_modelfile(tmp_path, "pkg-q8_0.gguf", tok, run_config, filename="pkg.Modelfile")
    assert named.name == "pkg.Modelfile" and "ollama create NAME -f pkg.Modelfile" in \
        named.read_text() and parse_modelfile(named.read_text())["from"] == "./pkg-q8_0.gguf"
    for bad in ("../m.gguf", "sub/m.gguf", "m.bin"):
        with pytest.raises(PackageError):
            write_modelfile(tmp_path, bad, tok, run_config)


def test_unknown_or_deviating_template_gets_no_template(tmp_path):
    tok = chatml_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    text = modelfile_text(tok, "chat", [tok.eos_token_id], "m.gguf")
    assert detect_shape(tok, "chat") is None and "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert parse_modelfile(text) == {"from": "./m.gguf", "stop": ["<|im_end|>"]}
    # looks like ChatML, but no newline after <|im_end|>: rendered differently, so refused
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + "
                         "m['content'] + '<|im_end|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert detect_shape(tok, "chat") is None


def test_system_with_triple_quotes_is_refused():
    tok = chatml_tokenizer()
    with pytest.raises(PackageError, match="SYSTEM"):
        modelfile_text(tok, "chat", [2], "m.gguf", system='say """ hi')
    text = modelfile_text(tok, "chat", [2], "m.gguf", system='Say "hi".\nTwice.')
    assert parse_modelfile(text)["system"] == 'Say "hi".\nTwice.'


# ------------------------------------------------------------------------------------------------
# vLLM rules
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return tiny_llama_for(chatml_tokenizer(), tmp_path_factory.mktemp("targets") / "base")


@pytest.fixture(scope="module")
def good_adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("good") / "final_model",
                        lora_b_std=0.3)


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _add_tensor(folder: Path, name: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[name] = torch.zeros(4, 4)
    save_file(tensors, str(path))


BREAKS = {
    "peft_type": lambda f: _edit_config(f, peft_type="LOHA"),
    "task_type": lambda f: _edit_config(f, task_type="SEQ_CLS"),
    "safetensors_weights": lambda f: (f / "adapter_model.safetensors").unlink(),
    "target_modules": lambda f: _edit_config(f, target_modules="all-linear"),
    "rank": lambda f: _edit_config(f, rank_pattern={"q_proj": 1024}),
    "modules_to_save": lambda f: _edit_config(f, modules_to_save=["lm_head"]),
    "bias": lambda f: _edit_config(f, bias="all"),
    "dora": lambda f: _edit_config(f, use_dora=True),
    "peft_features": lambda f: _edit_config(f, init_lora_weights="pissa"),
    "adapted_modules": lambda f: _add_tensor(
        f, "base_model.model.model.embed_tokens.lora_embedding_A"),
}


def test_every_rule_passes_on_a_trained_adapter(good_adapter):
    # peft saves all-linear resolved into the module list vLLM and others need
    assert isinstance(json.loads((good_adapter / "adapter_config.json").read_text())
                      ["target_modules"], list)
    results = check_vllm_adapter(good_adapter)
    assert set(BREAKS) == {r.rule for r in results} == {rule for rule, _ in RULES}
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    assert dict((r.rule, r.detail) for r in results)["rank"] == "r=8: serve with --max-lora-rank 8"


@pytest.mark.parametrize("rule", sorted(BREAKS))
def test_each_rule_fails_on_an_adapter_broken_for_it(good_adapter, tmp_path, rule):
    broken = tmp_path / "broken"
    shutil.copytree(good_adapter, broken)
    BREAKS[rule](broken)
    failed = [r.rule for r in check_vllm_adapter(broken) if not r.passed]
    assert failed == [rule]


def test_rank_choices_and_an_unreadable_config(tmp_path):
    assert [max_lora_rank_for(r) for r in (1, 4, 8, 9, 16, 17, 300, 512, 513)] == \
        [1, 8, 8, 16, 16, 32, 320, 512, None]
    (tmp_path / "adapter_config.json").write_text("{not json")
    results = check_vllm_adapter(tmp_path)
    assert len(results) == len(RULES) and not any(r.passed for r in results)


# ------------------------------------------------------------------------------------------------
# Packaging: metadata, Modelfile beside a GGUF, the card's YAML and usage, --verify's report
# ------------------------------------------------------------------------------------------------
def _card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


@pytest.fixture
def gguf_in_stage(monkeypatch):
    """Stand in for the GGUF export: a file named like one, put into the package folder."""
    original = package_module.stage_files

    def stage_with_gguf(cfg, inputs, stage):
        tokenizer = original(cfg, inputs, stage)
        (stage / "model-q8_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 stand-in")
        return tokenizer

    monkeypatch.setattr(package_module, "stage_files", stage_with_gguf)


def test_package_with_gguf_ships_modelfile_card_and_vllm_report(good_adapter, tmp_path,
                                                                  gguf_in_stage, capsys):
    result = run_package(PackageArgs(adapter_path=str(good_adapter),
                                     output_dir=str(tmp_path / "packages"),
                                     record_generation=False))
    name = result["name"]
    with tarfile.open(result["archive"], "r:gz") as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        modelfile = tar.extractfile(members[MODELFILE]).read().decode()
    assert {"model-q8_0.gguf", MODELFILE} <= set(members)
    parsed = parse_modelfile(modelfile)
    assert parsed["from"] == "./model-q8_0.gguf" and parsed["system"] == CHATML_DEFAULT_SYSTEM
    meta = json.loads(Path(result["metadata"]).read_text())
    assert meta["files"][MODELFILE] and meta["lora"]["vllm"]["compatible"] is True
    assert meta["lora"]["vllm"]["max_lora_rank"] == 8
    assert [r["rule"] for r in meta["lora"]["vllm"]["rules"]] == [rule for rule, _ in RULES]
    card = _card(Path(result["readme"]))
    assert card.data.base_model is None  # a local folder is no Hub id
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["lora", "sft", "gguf"] and card.data.license is None
    for snippet in (f"ollama create {name.lower()} -f Modelfile", f"ollama run {name.lower()}",
                    "llama-cli -m model-q8_0.gguf -cnv", "Llama(model_path='model-q8_0.gguf'",
                    "--enable-lora --max-lora-rank 8", "/path/to/base-model",
                    "PeftModel.from_pretrained(model, adapter)"):
        assert snippet in card.text, snippet
    capsys.readouterr()
    assert llama_package.main(["--verify", result["archive"]]) == 0
    out = capsys.readouterr().out
    assert "Modelfile: FROM ./model-q8_0.gguf present" in out
    assert out.count("vLLM ok") == len(RULES) and "vLLM WARN" not in out


def test_verify_warns_on_a_failing_vllm_rule_but_passes(good_adapter, tmp_path, capsys):
    adapter = tmp_path / "final_model"
    shutil.copytree(good_adapter, adapter)
    _edit_config(adapter, target_modules="all-linear")  # peft still loads it
    result = run_package(PackageArgs(adapter_path=str(adapter), output_dir=str(tmp_path / "p"),
                                     record_generation=False))
    vllm = json.loads(Path(result["metadata"]).read_text())["lora"]["vllm"]
    assert vllm["compatible"] is False
    card = Path(result["readme"]).read_text()
    assert "- vLLM: does not load as is (target_modules:" in card and "vllm serve" not in card
    assert "ollama" not in card and MODELFILE not in card  # no GGUF in this package
    capsys.readouterr()
    assert llama_package.main(["--verify", result["archive"]]) == 0
    out = capsys.readouterr().out
    assert "vLLM WARN target_modules: target_modules is 'all-linear'" in out
    assert "warning: vLLM would not load this adapter as is (target_modules)" in out


def test_card_header_for_the_embedded_base_with_qlora(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "final_model", lora_b_std=0.3,
                           base_model="smollm2-135m", quantization="4bit")
    result = run_package(PackageArgs(adapter_path=str(adapter), output_dir=str(tmp_path / "p"),
                                     record_generation=False))
    text = Path(result["readme"]).read_text()
    assert text.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    card = _card(Path(result["readme"]))
    assert card.data.to_dict() == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "peft",
        "license": "apache-2.0", "pipeline_tag": "text-generation",
        "tags": ["lora", "sft", "qlora", "4bit"]}
    assert "`python3 llama_model.py` prints it" in card.text  # vLLM serves the converted folder
