"""Prompt formats: the tokenizer's chat template, or the documented instruction template for
base models; rendering for training and generation, and the sample prompts logged in training."""

from __future__ import annotations

from typing import Any

from llama_sft.errors import DatasetError

# Template for base models without a chat template (Llama-2 -hf). Documented in the README.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


INSTRUCTION_TEMPLATE_WITH_CONTEXT = ("### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n"
                                     "### Response:\n")


def resolve_prompt_format(tokenizer, prompt_format: str = "auto") -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "instruction"
    if prompt_format == "chat" and not has_template:
        raise DatasetError("--prompt-format chat: this tokenizer has no chat template; use "
                           "--prompt-format instruction (or auto)")
    return prompt_format


def user_message(instruction: str, context: str) -> str:
    return f"{instruction.strip()}\n\n{context.strip()}" if context.strip() else instruction.strip()


def render_prompt(tokenizer, prompt_format: str, instruction: str, context: str) -> str:
    """The text the model sees before its response; used for training and for generation."""
    if prompt_format == "chat":
        msgs = [{"role": "user", "content": user_message(instruction, context)}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    if context.strip():
        return bos + INSTRUCTION_TEMPLATE_WITH_CONTEXT.format(instruction=instruction.strip(),
                                                               context=context.strip())
    return bos + INSTRUCTION_TEMPLATE.format(instruction=instruction.strip())


def _prompt_ids(tokenizer, prompt_format: str, texts: list[str]) -> list[list[int]]:
    # The rendered prompt already holds BOS/special tokens as text (chat template or our bos).
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def sample_prompts_from(examples, tokenizer, prompt_format: str, n: int) -> list[dict[str, Any]]:

    out = []
    for ex in examples[:n]:
        out.append({"prompt": render_prompt(tokenizer, prompt_format, ex.instruction, ex.context),
                    "prompt_preview": (ex.instruction[:60] + ("..." if len(ex.instruction) > 60 else "")),
                    "reference": ex.response})
    return out
