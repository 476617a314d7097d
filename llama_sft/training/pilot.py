"""The pilot stage behind llama_pilot.py: train on ~80% of the golden set, measure the base and
the tuned model on the held-out rest, project full training, and say go or no-go.

    python3 llama_pilot.py --golden-set ./sft_output/golden_set.jsonl --output-dir ./pilot_output
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_sft.config import PilotArgs
from llama_sft.data.cache import CacheSpec, open_or_build
from llama_sft.data.loader import file_sha256, load_and_validate
from llama_sft.data.prompts import (
    generation_prompt,
    resolve_prompt_format,
    sample_prompts_from,
)
from llama_sft.data.sources import source_kind
from llama_sft.data.splits import dataset_hash, split_examples
from llama_sft.data.tokenize import tokenize_examples
from llama_sft.errors import DatasetError
from llama_sft.evaluation.generate import generate
from llama_sft.evaluation.metrics import aggregate, perplexity, score_example
from llama_sft.files import write_json_atomic
from llama_sft.layout import METRICS, PILOT_EVALUATION, RUN_OUTPUTS, RunConfig
from llama_sft.modeling.load import load_model, load_tokenizer, resolve_base_model
from llama_sft.modeling.loss import mean_supervised_loss
from llama_sft.modeling.merge import generation_model, generation_route
from llama_sft.training.outputs import check_output_dir, finish_outputs
from llama_sft.training.recipe import run_sft
from llama_sft.training.train import make_run_config

logger = logging.getLogger("llama_sft")





def task_score(m: dict[str, Any]) -> float:
    """One number per example: JSON field accuracy for JSON answers, final-answer exact match
    where the reference has a '#### N' answer, else normalised exact match."""
    if m.get("json_field_accuracy") is not None:
        return float(m["json_field_accuracy"])
    if m.get("answer_exact_match") is not None:
        return float(m["answer_exact_match"])
    return float(m["exact_match"])


def score_generations(examples, generations, answer_regex) -> tuple[list[dict], dict[str, Any]]:

    rows = []
    for ex, g in zip(examples, generations):
        m = score_example(g.text, ex.response, answer_regex=answer_regex)
        m["task_score"] = task_score(m)
        rows.append({**m, "category": ex.category, "new_tokens": g.new_tokens,
                     "ended_with_eos": g.ended_with_eos, "prediction": g.text,
                     "reference": ex.response})
    summary = aggregate(rows, by="category")
    _add_task_score(summary, rows)
    return rows, summary


def _add_task_score(summary: dict[str, Any], rows: list[dict]) -> None:
    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    summary["overall"]["task_score"] = mean([r["task_score"] for r in rows])
    for cat, group in summary["by_category"].items():
        group["task_score"] = mean([r["task_score"] for r in rows if r["category"] == cat])


def project_full_training(cfg: PilotArgs, tokenizer, prompt_format: str,
                          tokens_per_second: float) -> dict[str, Any]:
    """Full-training time on --dataset at the measured throughput (same model and settings)."""

    path = cfg.dataset
    if not path or source_kind(path) == "missing":
        return {"available": False,
                "reason": f"--dataset {path} not found" if path else "no --dataset given"}
    # Through the tokenized cache: the full training run with these flags then finds it built.
    try:
        cache = open_or_build(CacheSpec.for_args(cfg, path, tokenizer, prompt_format))
    except DatasetError as e:
        return {"available": False, "reason": str(e)}
    splits, _ = cache.split(val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio)
    stats = cache.stats(splits["train"])
    epochs = cfg.num_epochs
    tokens = stats.total_tokens * epochs
    seconds = tokens / max(tokens_per_second, 1e-9)
    return {"available": True, "dataset": Path(path).name, "train_examples": int(len(splits["train"])),
            "epochs": epochs, "tokens": int(tokens),
            "measured_tokens_per_second": round(tokens_per_second, 1),
            "projected_seconds": round(seconds), "projected_hours": round(seconds / 3600, 2),
            "note": "same model, hardware and settings as this pilot; a GPU or another model "
                    "size changes it"}


@dataclass
class HeldOutResult:
    """One model's figures on the held-out golden examples."""

    loss: float
    generations: list[Any]
    summary: dict[str, Any]

    def section(self) -> dict[str, Any]:
        return {"loss": round(self.loss, 6), "perplexity": round(perplexity(self.loss), 4),
                "metrics": self.summary}


def split_golden(cfg: PilotArgs):
    """(golden, train examples, held-out examples, removed): ~80/20 by content hash."""
    golden, _ = load_and_validate(cfg.golden_set, field_map=cfg.field_map,
                                  skip_invalid=cfg.skip_invalid, what="--golden-set")
    splits, removed = split_examples(golden, val_ratio=cfg.holdout_ratio, test_ratio=0.0)
    train_ex, held_out = splits["train"], splits["val"]
    if len(train_ex) < 4 or len(held_out) < 2:
        raise DatasetError(f"--golden-set {cfg.golden_set}: {len(golden)} examples leave "
                           f"{len(train_ex)} to train and {len(held_out)} to hold out; the pilot "
                           "needs at least 4 and 2 (the guide's golden set has 150)")
    return golden, train_ex, held_out, removed


def evaluate_held_out(model, tokenizer, cfg: PilotArgs, rows, prompts, examples,
                      stats: dict[str, Any] | None = None) -> HeldOutResult:
    """Teacher-forced loss (through `model`) and scored greedy generations on the held-out
    part. Both the base and the tuned model generate through modeling/merge.py's plain copy
    where it fits (4-bit weights de-quantized, LoRA merged), so their speeds compare like for
    like and the tuned model is not slowed by unmerged LoRA layers."""
    loss = mean_supervised_loss(model, rows, tokenizer.pad_token_id)
    stats = {} if stats is None else stats
    with generation_model(model) as gen_model:
        stats["through"] = generation_route(model, gen_model)
        gens = generate(gen_model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.eval_batch_size, progress=True, stats=stats)
    _, summary = score_generations(examples, gens, cfg.answer_regex)
    return HeldOutResult(loss, gens, summary)


def pilot_checks(cfg: PilotArgs, losses: list[float], base: HeldOutResult,
                 tuned: HeldOutResult) -> dict[str, dict[str, Any]]:
    """The go/no-go checks, each with the reason it passed or failed."""
    before, after = base.summary["overall"], tuned.summary["overall"]
    non_finite = any(not math.isfinite(x) for x in losses + [tuned.loss])
    return {
        "loss_decreased": _check(len(losses) >= 2 and losses[-1] < losses[0],
                                 f"train loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else
                                 "no loss logged"),
        "no_nan": _check(not non_finite, "all logged losses finite" if not non_finite else
                         "a non-finite loss was logged"),
        "generations_end_with_eos": _check(after.get("eos_rate", 0) >= 0.9,
                                           f"{after.get('eos_rate', 0):.0%} of tuned generations "
                                           "ended at a stop token (turn end or EOS) within "
                                           f"{cfg.max_new_tokens} tokens (need >= 90%)"),
        "tuned_beats_base": _check(after["task_score"] > before["task_score"] and
                                   tuned.loss < base.loss,
                                   f"task score {before['task_score']:.3f} -> "
                                   f"{after['task_score']:.3f}, held-out loss {base.loss:.4f} -> "
                                   f"{tuned.loss:.4f}"),
    }


def _training_section(cfg: PilotArgs, run_config: RunConfig, train_results: dict[str, Any],
                      losses: list[float]) -> dict[str, Any]:
    return {
        "steps": train_results["global_step"], "max_steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate, "lora": run_config.lora,
        "train_seconds": train_results["train_runtime_seconds"],
        "tokens_per_second": train_results["tokens_per_second"],
        "supervised_tokens_per_second": train_results["supervised_tokens_per_second"],
        "peak_memory_mb": train_results["peak_memory_mb"],
        "loss_start": losses[0] if losses else None,
        "loss_end": losses[-1] if losses else None,
        "status": train_results["status"],
    }


def _task_metric(base: HeldOutResult, tuned: HeldOutResult, held_out: int) -> dict[str, Any]:
    before, after = base.summary["overall"], tuned.summary["overall"]
    return {"name": "task_score", "before": round(before["task_score"], 4),
            "after": round(after["task_score"], 4),
            "exact_match_before": round(before.get("exact_match", 0), 4),
            "exact_match_after": round(after.get("exact_match", 0), 4),
            "held_out_examples": held_out}


def _recommendation(checks: dict[str, dict[str, Any]]) -> str:
    if all(c["passed"] for c in checks.values()):
        return "GO: the pipeline works and fine-tuning helps; run full training (llama_train.py)"
    return "NO-GO: " + "; ".join(f"{k}: {c['reason']}" for k, c in checks.items()
                                 if not c["passed"])


def tokenize_pilot(cfg: PilotArgs, tokenizer, fmt: str, train_ex, held_out):
    """(train rows, held-out rows, held-out prompts). A held-out conversation is scored on its
    last assistant turn, the one generated from the history before it."""
    train_rows = tokenize_examples(train_ex, tokenizer, max_length=cfg.max_length,
                                   prompt_format=fmt, label_mode=cfg.label_mode)
    held_rows = tokenize_examples(held_out, tokenizer, max_length=cfg.max_length,
                                  prompt_format=fmt, label_mode="last")
    return train_rows, held_rows, [generation_prompt(tokenizer, fmt, ex) for ex in held_out]


def run_pilot(cfg: PilotArgs, *, model_choice: str = "") -> dict[str, Any]:
    """Train on ~80% of the golden set, evaluate the base and the tuned model on the rest, and
    write pilot_evaluation.json (its layout: the llama_pilot.py docstring)."""
    import torch

    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir, cfg.resume, RUN_OUTPUTS + (PILOT_EVALUATION,))
    golden, train_ex, held_out, removed = split_golden(cfg)
    base_model = resolve_base_model(cfg.model_size, cfg.base_model)
    logger.info("pilot model: %s (%s)", base_model, model_choice)
    tokenizer = load_tokenizer(base_model, trust_remote_code=cfg.trust_remote_code)
    fmt = resolve_prompt_format(tokenizer, cfg.prompt_format)
    train_rows, held_rows, prompts = tokenize_pilot(cfg, tokenizer, fmt, train_ex, held_out)
    info = {"path": Path(cfg.golden_set).name, "file_sha256": file_sha256(cfg.golden_set),
            "dataset_hash": dataset_hash(golden),
            "splits": {"train": len(train_ex), "held_out": len(held_out)}, "removed": removed}
    run_config = make_run_config(cfg, stage="pilot", base_model=base_model, tokenizer=tokenizer,
                                 prompt_format=fmt, dataset_info=info)

    t_start = time.perf_counter()
    model = load_model(base_model, use_4bit=cfg.use_4bit, use_8bit=cfg.use_8bit,
                       trust_remote_code=cfg.trust_remote_code, for_training=True)
    logger.info("before training: evaluating the base model on %d held-out examples",
                len(held_out))
    base_gen_stats: dict[str, Any] = {}
    base = evaluate_held_out(model, tokenizer, cfg, held_rows, prompts, held_out,
                             stats=base_gen_stats)
    result = run_sft(cfg, output_dir=output_dir, train_rows=train_rows, eval_rows=held_rows,
                     sample_prompts=sample_prompts_from(held_out, tokenizer, fmt,
                                                        cfg.num_sample_prompts),
                     run_config=run_config, tokenizer=tokenizer, model=model, stage="pilot")
    if result.get("exit_code"):
        # Stopped by SIGINT/SIGTERM: the checkpoint is saved; the evaluation would only be of
        # a half-trained adapter, so stop here and say how to continue.
        result.pop("model")
        return {"interrupted": True, "exit_code": result["exit_code"], "status": result["status"],
                "global_step": result["global_step"]}
    logger.info("after training: evaluating the tuned model on %d held-out examples",
                len(held_out))
    gen_stats: dict[str, Any] = {}
    tuned = evaluate_held_out(result["model"], tokenizer, cfg, held_rows, prompts, held_out,
                              stats=gen_stats)
    train_results = finish_outputs(result, tokenizer=tokenizer, output_dir=output_dir,
                                   run_config=run_config)
    losses = _train_losses(output_dir / METRICS)
    checks = pilot_checks(cfg, losses, base, tuned)
    report: dict[str, Any] = {
        "model": {"base_model": base_model, "model_size": cfg.model_size, "why": model_choice,
                  "quantization": run_config.quantization, "prompt_format": fmt,
                  "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "data": info,
        "training": _training_section(cfg, run_config, train_results, losses),
        "eval_before": base.section(), "eval_after": tuned.section(),
        "task_metric": _task_metric(base, tuned, len(held_out)),
        "samples": [{"category": ex.category, "prompt": p, "reference": ex.response,
                     "base_output": b.text, "tuned_output": t.text}
                    for ex, p, b, t in list(zip(held_out, prompts, base.generations,
                                                tuned.generations))[:10]],
        "generation": _generation_section(gen_stats, base_gen_stats, len(held_out)),
        "projection": project_full_training(cfg, tokenizer, fmt,
                                            train_results["tokens_per_second"]),
        "checks": checks, "go": all(c["passed"] for c in checks.values()),
        "recommendation": _recommendation(checks),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "final_model": train_results.get("final_model"),
    }
    write_json_atomic(output_dir / PILOT_EVALUATION, report)
    return report


def _generation_section(tuned: dict[str, Any], base: dict[str, Any],
                        answers: int) -> dict[str, Any]:
    """The tuned model's generation figures, the base model's beside them, and their ratio.
    tokens/s also depends on how long the answers are (a tuned model that stops sooner spends a
    larger share of its time on the prompts' prefill), so each side also gets its mean answer
    length and seconds per answer, and the length-fair ratio: the base's time per decode step
    over the tuned model's (the same prompts in the same batches, so the same shapes per step;
    1.0 means the tuned model decodes as fast as the base)."""
    tuned, base = _per_answer(tuned, answers), _per_answer(base, answers)
    ratio = (tuned.get("tokens_per_second", 0.0) / base["tokens_per_second"]
             if base.get("tokens_per_second") else None)
    step = (base["ms_per_decode_step"] / tuned["ms_per_decode_step"]
            if base.get("ms_per_decode_step") and tuned.get("ms_per_decode_step") else None)
    return {**tuned, "base": base,
            "tuned_over_base_tokens_per_second": None if ratio is None else round(ratio, 3),
            "tuned_over_base_decode_step_speed": None if step is None else round(step, 3)}


def _check(passed: bool, reason: str) -> dict[str, Any]:
    return {"passed": bool(passed), "reason": reason}


def _train_losses(metrics_file: Path) -> list[float]:
    """Logged train losses, each the mean over its logging window. The step-1 record (one
    batch, logged first) is left out when fuller windows follow: one batch is too noisy to
    compare against."""
    import json

    recs = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                recs.append(rec)
    if len(recs) > 2 and recs[0].get("step") == 1 and recs[1].get("step", 0) > 2:
        recs = recs[1:]
    return [float(r["loss"]) for r in recs]


def _per_answer(stats: dict[str, Any], answers: int) -> dict[str, Any]:
    """generate()'s stats plus the answer count, mean answer length and seconds per answer."""
    if not answers or "seconds" not in stats:
        return stats
    return {**stats, "answers": answers,
            "mean_answer_tokens": round(stats.get("generated_tokens", 0) / answers, 1),
            "seconds_per_answer": round(stats["seconds"] / answers, 3)}


def _speed(d: dict[str, Any]) -> str:
    parts = []
    if "seconds_per_answer" in d:
        parts += [f"{d['mean_answer_tokens']:.0f} tokens", f"{d['seconds_per_answer']:.2f} s an answer"]
    if d.get("ms_per_decode_step"):
        parts.append(f"{d['ms_per_decode_step']:.0f} ms a decode step")
    return f"{d.get('tokens_per_second', 0):.0f} tok/s" + (f" ({', '.join(parts)})" if parts else "")


def format_summary(r: dict[str, Any]) -> str:
    t, tm = r["training"], r["task_metric"]
    lines = [
        f"Pilot: {r['model']['base_model']} ({r['model']['why']})",
        f"  trained {t['steps']} steps in {t['train_seconds']:.0f} s "
        f"({t['tokens_per_second']:.0f} tok/s, peak memory {t['peak_memory_mb']:.0f} MB); "
        f"train loss {t['loss_start']:.4f} -> {t['loss_end']:.4f}",
        f"  held-out ({tm['held_out_examples']} examples): loss {r['eval_before']['loss']:.4f} -> "
        f"{r['eval_after']['loss']:.4f}, task score {tm['before']:.3f} -> {tm['after']:.3f}, "
        f"exact match {tm['exact_match_before']:.3f} -> {tm['exact_match_after']:.3f}",
    ]
    by_b = r["eval_before"]["metrics"]["by_category"]
    by_a = r["eval_after"]["metrics"]["by_category"]
    for cat in by_a:
        lines.append(f"    {cat:<24} {by_b[cat]['task_score']:.2f} -> {by_a[cat]['task_score']:.2f}"
                     f"  (n={by_a[cat]['n']})")
    g = r.get("generation") or {}
    if g.get("base"):
        lines.append(f"  generation: base {_speed(g['base'])}, tuned {_speed(g)}, through "
                     f"{g.get('through', '')}")
        if g.get("tuned_over_base_decode_step_speed"):
            lines.append(f"  tuned model's decode speed per step: "
                         f"{g['tuned_over_base_decode_step_speed']:.2f}x the base's (length-fair; "
                         "tok/s also counts the prompts' prefill over fewer or more answer tokens)")
    p = r["projection"]
    if p.get("available"):
        lines.append(f"  full training on {p['dataset']} ({p['train_examples']} examples x "
                     f"{p['epochs']:g} epochs) at this speed: ~{p['projected_hours']:.1f} h")
    for name, c in r["checks"].items():
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] {name}: {c['reason']}")
    lines.append(r["recommendation"])
    return "\n".join(lines)


