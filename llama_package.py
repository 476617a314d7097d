r"""Package a trained LoRA adapter for distribution, and verify a package.

The guide's command (the base model and size must match the adapter's run_config.json):

    python3 llama_package.py \
      --adapter-path ./training_output/final_model \
      --base-model meta-llama/Llama-2-7b-hf \
      --model-size 7b \
      --output-dir ./packages

Chained from training and evaluation on the CPU (base model and size come from the adapter's
run_config.json; an evaluation_results.json beside the adapter or its parent folder is picked
up and shown in the model card):

    python3 llama_evaluate.py --adapter-path ./training_output/final_model \
        --dataset ./sft_output/golden_set.jsonl --output ./training_output/evaluation_results.json
    python3 llama_package.py --adapter-path ./training_output/final_model --output-dir ./packages
    python3 llama_package.py --verify ./packages/smollm2-135m-lora-<sha8>.tar.gz

Also write a merged full model (base weights + adapter, loads without peft):

    python3 llama_package.py --adapter-path ./training_output/final_model --output-dir ./packages --merge

Writes into --output-dir (NAME defaults to <base model>-lora-<first 8 hex of the adapter's sha256>):

    NAME.tar.gz                the archive: one folder NAME/ holding
        adapter_model.safetensors, adapter_config.json   the adapter (peft)
        tokenizer files                                  tokenizer.json, tokenizer_config.json, ...
        run_config.json                                  the training config (home paths removed)
        evaluation_results.json                          when evaluation results were found
        README.md                                        model card: usage and prompt format
        requirements.txt                                 pinned library versions
        metadata.json                                    allow-listed facts and every file's sha256
        SHA256SUMS                                       sha256 of every other member
    NAME.tar.gz.sha256         sha256 of the archive (publish it beside the archive)
    NAME.metadata.json, NAME.README.md, NAME.requirements.txt   copies, readable without unpacking
    NAME-merged/               with --merge: model.safetensors, config.json, tokenizer files

--verify ARCHIVE refuses absolute paths, '..', links and devices before extracting anything,
extracts with tarfile's "data" filter, checks SHA256SUMS (every member listed, every sum equal),
loads the adapter on its base model and greedily generates on a fixed prompt, which must equal
the text recorded at packaging time when the device and dtype are the same.
SHA256SUMS protects against corruption and naive tampering; for authenticity compare the
archive's sha256 with the one you published (NAME.tar.gz.sha256 is checked when present).

Exit codes: 0 done, 1 verification failed (tampered, unsafe or mismatching archive),
2 bad input (a one-line `error: ...`).
"""

from __future__ import annotations

import argparse
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from llama_sft.cli import ArgumentParser
    from llama_sft.config import PackageArgs, add_dataclass_args

    p = ArgumentParser(prog="llama_package.py", description=__doc__)
    add_dataclass_args(p, PackageArgs)
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 verification failed, 2 bad input; one `error: ...` line."""
    from llama_sft.cli import run_cli
    from llama_sft.config import PackageArgs, parse_stage_config

    def body() -> int:
        cfg = parse_stage_config(build_parser(), argv, PackageArgs)
        # The library is imported after the flags are parsed, so --help answers fast.
        if cfg.verify:
            from llama_sft.packaging.verify import run_verify

            result = run_verify(cfg)
            print(f"OK: {result['archive']} verified ({result['files_checked']} files)")
        else:
            from llama_sft.packaging.package import format_package_summary, run_package

            print(format_package_summary(run_package(cfg)))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
