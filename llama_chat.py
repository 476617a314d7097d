r"""Chat with a tuned model: multi-turn, streamed, in the prompt format it was trained with.

Chained from training or packaging (the base model, prompt format and stop tokens come from the
adapter's run_config.json; an archive is checked and extracted as `--verify` does first):

    python3 llama_train.py --model-size 135m --dataset ./sft_output/sft_dataset.jsonl \
        --golden-set ./sft_output/golden_set.jsonl --output-dir ./training_output --max-steps 100
    python3 llama_chat.py --adapter-path ./training_output/final_model
    python3 llama_chat.py --adapter-path ./packages/smollm2-135m-lora-<sha8>.tar.gz
    python3 llama_chat.py --model ./packages/smollm2-135m-lora-<sha8>-merged

One answer, for scripts (only the answer goes to stdout; `--prompt -` reads it from stdin):

    python3 llama_chat.py --adapter-path ./training_output/final_model \
        --prompt "List three primary colors." > answer.txt
    echo "What is 12 * 7?" | python3 llama_chat.py --model-size 135m --prompt -

A base model alone (the embedded CPU model here), with a system turn:

    python3 llama_chat.py --model-size 135m --system "Answer in one sentence."

In the chat: /reset clears the history (the system turn stays), /system TEXT sets the system
turn and resets, /exit or Ctrl-D leaves (exit 0); Ctrl-C stops an answer, and at the prompt
exits 130. The history is rendered as training renders a conversation; when it outgrows the
context (--context-length, default the model's), the earliest exchanges are dropped. Greedy by
default: an answer equals llama_evaluate.py's generation for the same prompt. -v logs each
rendered prompt. Writes nothing to disk.

Exit codes: 0 done, 2 bad input (a one-line `error: ...`: a missing folder, a folder that is
neither an adapter nor a model, an archive that fails verification), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from llama_sft.cli import ArgumentParser
    from llama_sft.config import ChatArgs, add_dataclass_args

    p = ArgumentParser(prog="llama_chat.py", description=__doc__)
    add_dataclass_args(p, ChatArgs, group_title="what to chat with",
                       only=("adapter_path", "model", "base_model", "model_size",
                             "prompt_format"))
    add_dataclass_args(p, ChatArgs, group_title="conversation",
                       only=("system", "prompt", "context_length"))
    add_dataclass_args(p, ChatArgs, group_title="generation and loading",
                       only=("max_new_tokens", "do_sample", "temperature", "top_p", "seed",
                             "dtype", "use_4bit", "use_8bit", "trust_remote_code"))
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Debug logging (shows each rendered prompt).")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one `error: ...` line), 130 Ctrl-C."""
    from llama_sft.cli import run_cli
    from llama_sft.config import ChatArgs, parse_stage_config, validate

    def body() -> int:
        cfg = parse_stage_config(build_parser(), argv, ChatArgs)
        validate(cfg)
        # Imported once the flags are checked, so --help and flag errors answer without torch.
        from llama_sft.inference.chat import run_chat

        run_chat(cfg)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
