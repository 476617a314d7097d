"""Pinned regression: five optimizer steps of llama_train.py on the tiny random LLaMA, compared
with numbers measured on the code before the llama_sft/ restructure (identical over two runs).

Self-comparisons (resume vs. uninterrupted, one process vs. two) cannot see a change that moves
both sides; these pinned values can."""

from __future__ import annotations

import json

import torch
from helpers import adapter_tensors, tiny_args

import llama_train

STEPS = [1, 2, 3, 4, 5]
LOSS = [10.822592735290527, 10.786567687988281, 10.787321090698242, 10.864492416381836,
        10.659319877624512]
GRAD_NORM = [0.49703913927078247, 0.5544263124465942, 0.3942475914955139, 0.9787244200706482,
             0.3784167766571045]
TOKENS_SEEN = [686, 1309, 1818, 2111, 2665]
SUPERVISED_TOKENS_SEEN = [155, 377, 499, 519, 671]
EVAL_LOSS_AT_5 = 10.666786193847656
ADAPTER_TENSORS = 28
ADAPTER_ABS_SUM = 1068.851269205199
LORA_B_SQUARE_SUM = 0.9349236076042078

# bf16 autocast on a CPU is deterministic on one machine kind, so the run repeats exactly; 1e-3
# still allows another CPU's kernels, while any change of labels, loss normalisation, sampler
# order or LR schedule moves these values by far more.
RTOL = 1e-3


def _float64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_five_steps_on_the_tiny_llama_match_the_pinned_numbers(tmp_path, tiny_llama_dir):
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "5", "--eval-steps", "5")
    assert llama_train.main(argv) == 0
    records = [json.loads(line)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(train) == STEPS

    def column(key):
        return torch.tensor([train[step][key] for step in STEPS], dtype=torch.float64)

    torch.testing.assert_close(column("loss"), _float64(LOSS), rtol=RTOL, atol=0)
    torch.testing.assert_close(column("grad_norm"), _float64(GRAD_NORM), rtol=RTOL, atol=0)
    assert [train[step]["tokens_seen"] for step in STEPS] == TOKENS_SEEN
    assert [train[step]["supervised_tokens_seen"] for step in STEPS] == SUPERVISED_TOKENS_SEEN
    torch.testing.assert_close(evals[5]["eval_loss"], EVAL_LOSS_AT_5, rtol=RTOL, atol=0)

    adapter = adapter_tensors(tmp_path / "run" / "final_model")
    assert len(adapter) == ADAPTER_TENSORS
    abs_sum = sum(t.double().abs().sum().item() for t in adapter.values())
    lora_b_square_sum = sum(t.double().pow(2).sum().item()
                            for name, t in adapter.items() if "lora_B" in name)
    torch.testing.assert_close(abs_sum, ADAPTER_ABS_SUM, rtol=RTOL, atol=0)
    torch.testing.assert_close(lora_b_square_sum, LORA_B_SQUARE_SUM, rtol=RTOL, atol=0)
