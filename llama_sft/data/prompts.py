"""Prompt formats: the tokenizer's chat template, or the documented instruction template for
base models; rendering for training and generation, the tokens that end an assistant turn, the
stop tokens of generation, and the sample prompts logged in training.

The instruction template (no chat template), single turn:

    {bos}### Instruction:\n{instruction}\n\n[### Input:\n{context}\n\n]### Response:\n{response}{eos}

and a conversation (an optional system turn, then exchanges):

    {bos}[### System:\n{system}\n\n]### Instruction:\n{user 1}\n\n### Response:\n{assistant 1}{eos}
    \n\n### Instruction:\n{user 2}\n\n### Response:\n{assistant 2}{eos}
"""

from __future__ import annotations

from typing import Any, Sequence

from llama_sft.data.schemas import Example, user_message
from llama_sft.errors import DatasetError

# Template for base models without a chat template (Llama-2 -hf). Documented in the README.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_TEMPLATE_WITH_CONTEXT = ("### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n"
                                     "### Response:\n")
SYSTEM_BLOCK = "### System:\n{system}\n\n"
TURN_SEPARATOR = "\n\n"

# Probe contents for finding what a chat template writes after an assistant turn.
_PROBE_USER, _PROBE_ANSWER = "Probe question", "Probe answer"


def resolve_prompt_format(tokenizer, prompt_format: str = "auto") -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "instruction"
    if prompt_format == "chat" and not has_template:
        raise DatasetError("--prompt-format chat: this tokenizer has no chat template; use "
                           "--prompt-format instruction (or auto)")
    return prompt_format


def render_prompt(tokenizer, prompt_format: str, instruction: str, context: str) -> str:
    """The text the model sees before a single-turn response; used for training and
    generation."""
    if prompt_format == "chat":
        msgs = [{"role": "user", "content": user_message(instruction, context)}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    if context.strip():
        return bos + INSTRUCTION_TEMPLATE_WITH_CONTEXT.format(instruction=instruction.strip(),
                                                               context=context.strip())
    return bos + INSTRUCTION_TEMPLATE.format(instruction=instruction.strip())


def render_conversation(tokenizer, prompt_format: str, messages: Sequence[dict[str, str]], *,
                        add_generation_prompt: bool = False) -> str:
    """A conversation as text: through the chat template, or the instruction template's
    conversation form (module docstring), whose user turn already ends with the response
    header, so a generation prompt adds nothing."""
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    parts = [tokenizer.bos_token or ""]
    for i, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "system":
            parts.append(SYSTEM_BLOCK.format(system=content.strip()))
        elif message["role"] == "user":
            if i and messages[i - 1]["role"] == "assistant":
                parts.append(TURN_SEPARATOR)
            parts.append(INSTRUCTION_TEMPLATE.format(instruction=content.strip()))
        else:
            parts.append(content + (tokenizer.eos_token or ""))
    return "".join(parts)


def generation_prompt(tokenizer, prompt_format: str, example: Example) -> str:
    """The prompt for an example's (last) assistant turn: the history before it, as trained."""
    if example.messages is None:
        return render_prompt(tokenizer, prompt_format, example.instruction, example.context)
    return render_conversation(tokenizer, prompt_format, example.conversation()[:-1],
                               add_generation_prompt=True)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
               if getattr(t, "special", False))
    return ids


def turn_end_ids(tokenizer, prompt_format: str) -> list[int]:
    """The token(s) that end an assistant turn: the first special token a chat template writes
    after an assistant's content (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `</s>` for
    Llama 2 chat); for the instruction template, EOS. Training supervises it; generation stops
    at it."""
    if prompt_format != "chat":
        if tokenizer.eos_token_id is None:
            raise DatasetError("the tokenizer has no EOS token; the model could never learn to "
                               "stop")
        return [tokenizer.eos_token_id]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}],
        tokenize=False)
    after = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
    special = _special_ids(tokenizer)
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return [token_id]
    raise DatasetError("the chat template ends an assistant turn with no special token (it "
                       f"writes {after!r} after the answer), so the model could never learn to "
                       "stop; use --prompt-format instruction, or a tokenizer whose template "
                       "closes each turn")


def stop_token_ids(tokenizer, prompt_format: str, generation_config: Any = None) -> list[int]:
    """Every id generation stops at: the turn end, the tokenizer's EOS, and the model's
    generation_config.eos_token_id (an int or a list, as Llama 3 ships it)."""
    ids = list(turn_end_ids(tokenizer, prompt_format))
    configured = getattr(generation_config, "eos_token_id", None)
    extra = configured if isinstance(configured, (list, tuple)) else [configured]
    for token_id in [tokenizer.eos_token_id, *extra]:
        if isinstance(token_id, int) and token_id not in ids:
            ids.append(token_id)
    return ids


def sample_prompts_from(examples, tokenizer, prompt_format: str, n: int) -> list[dict[str, Any]]:
    out = []
    for ex in examples[:n]:
        out.append({"prompt": generation_prompt(tokenizer, prompt_format, ex),
                    "prompt_preview": (ex.instruction[:60] + ("..." if len(ex.instruction) > 60 else "")),
                    "reference": ex.response})
    return out
