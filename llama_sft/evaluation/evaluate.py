"""TODO docstring"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from llama_sft.config import (
    EVAL_BATCH_SIZE,
    EvalArgs,
    config_to_dict,
    get_spec,
    raise_problems,
)
from llama_sft.data.loader import file_sha256, load_and_validate
from llama_sft.data.prompts import render_prompt, resolve_prompt_format
from llama_sft.data.splits import dataset_hash
from llama_sft.data.tokenize import tokenize_examples
from llama_sft.errors import ConfigError, ModelLoadError
from llama_sft.evaluation.generate import generate
from llama_sft.evaluation.metrics import (
    aggregate,
    compile_answer_regex,
    deltas,
    extract_answer,
    perplexity,
    score_example,
)
from llama_sft.files import (
    output_file_problem,
    safetensors_problem,
    same_file,
    sha256_file,
    write_text_atomic,
)
from llama_sft.layout import ADAPTER_WEIGHTS
from llama_sft.modeling.load import (
    best_dtype,
    load_model,
    load_tokenizer,
    read_run_config,
    resolve_base_model,
    same_base,
)
from llama_sft.modeling.loss import per_example_nll
from llama_sft.versions import CORE_LIBRARIES
from llama_sft.versions import library_versions as versions

logger = logging.getLogger("llama_sft")



# Fields that the adapter's run_config.json fills in unless given as a flag or in --config.
INHERITED_FIELDS = ("base_model", "model_size", "prompt_format", "max_length")


# DataArgs fields that evaluation neither exposes nor uses (kept out of the results JSON).
UNUSED_FIELDS = ("golden_set", "val_ratio", "test_ratio")


def explicit_fields(cfg: Any) -> set[str]:
    """Fields set by a flag or --config (resolve_config records sources); for a config built
    in code, the fields that differ from the dataclass default."""
    sources = getattr(cfg, "_sources", None)
    if sources is not None:
        return {k for k, s in sources.items() if s != "size default"}
    defaults = EvalArgs()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def check_eval_config(cfg: EvalArgs) -> None:
    """Evaluation-specific checks on top of llama_config.validate; raises once with all problems."""

    problems = []
    if not cfg.dataset:
        problems.append("--dataset is required (e.g. --dataset ./sft_output/golden_set.jsonl)")
    if cfg.num_samples is not None and cfg.num_samples < 1:
        problems.append(f"--num-samples must be >= 1, got {cfg.num_samples}")
    if cfg.do_sample and cfg.temperature <= 0:
        problems.append(f"--temperature must be > 0 with --do-sample, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.compare_base and not cfg.adapter_path:
        problems.append("--compare-base needs --adapter-path (the base model is the model "
                        "without the adapter)")
    if cfg.answer_regex:
        try:
            compile_answer_regex(cfg.answer_regex)
        except ValueError as e:
            problems.append(str(e))
    problems += output_problems(cfg)
    raise_problems(problems)


def samples_path_for(cfg: EvalArgs) -> Path:
    output = Path(cfg.output)
    return Path(cfg.samples_output) if cfg.samples_output else output.with_name(
        f"{output.stem}_samples.jsonl")


def _read_json_head(path: Path, limit: int = 64 << 20) -> Any:
    """The JSON in `path` (None when unreadable, not JSON, or larger than `limit`)."""
    try:
        if path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _is_samples_file(path: Path) -> bool:
    """Whether `path` is empty or looks like a samples JSONL this script wrote."""
    try:
        if path.stat().st_size == 0:
            return True  # nothing to lose
        with open(path, "rb") as fh:
            rec = json.loads(fh.readline(1 << 20))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(rec, dict) and {"index", "generation", "reference"} <= set(rec)


def output_problems(cfg: EvalArgs) -> list[str]:
    """--output and the samples file must not be the data, a folder, or (unless --overwrite)
    a file this script did not write. Checked before anything is loaded or written."""
    problems = []
    output, samples = Path(cfg.output), samples_path_for(cfg)
    checks = [("--output", output)] + ([("--samples-output", samples)] if cfg.samples_output
                                         else [])  # the default one sits beside --output
    for flag, path in checks:
        if same_file(path, cfg.dataset):
            problems.append(f"{flag} {path} is the --dataset file: writing there would destroy "
                            f"it; choose another {flag}")
        elif problem := output_file_problem(flag, path):
            problems.append(problem)
    if not cfg.samples_output and same_file(samples, cfg.dataset):
        problems.append(f"the samples file for --output {output} would be {samples}, the "
                        "--dataset file; choose another --output or pass --samples-output")
    if same_file(output, samples):
        problems.append(f"--samples-output {samples} is the --output file; give two files")
    if problems or cfg.overwrite:
        return problems
    if output.is_file() and output.stat().st_size:
        earlier = _read_json_head(output)
        if not (isinstance(earlier, dict) and earlier.get("stage") == "evaluate"):
            problems.append(f"--output {output} exists and is not a results file written by "
                            "llama_evaluate.py; choose another --output, or pass --overwrite to "
                            "replace it")
    if samples.is_file() and not _is_samples_file(samples):
        flag = "--samples-output" if cfg.samples_output else "the samples file"
        problems.append(f"{flag} {samples} exists and is not a samples file written by "
                        "llama_evaluate.py; choose another --output/--samples-output, or pass "
                        "--overwrite to replace it")
    return problems


def check_earlier_results(cfg: EvalArgs, *, base_model: str, adapter_sha: str | None,
                          dataset_sha: str) -> None:
    """An --output holding the results of another evaluation (another adapter, base model or
    data file) is refused unless --overwrite; the same evaluation is replaced with a notice."""
    output = Path(cfg.output)
    earlier = _read_json_head(output) if output.is_file() else None
    if not isinstance(earlier, dict) or earlier.get("stage") != "evaluate":
        return
    model, data = earlier.get("model") or {}, earlier.get("dataset") or {}
    same = (model.get("adapter_sha256") == adapter_sha and data.get("file_sha256") == dataset_sha
            and model.get("base_model") == base_model)
    what = (f"adapter sha256 {str(model.get('adapter_sha256'))[:12]}... on "
            f"{model.get('base_model')}" if model.get("adapter_sha256") else
            f"base model {model.get('base_model')}") + f", data {data.get('path')}"
    if same:
        logger.warning("replacing %s: results of an earlier evaluation of the same adapter on the "
                       "same data", output)
    elif cfg.overwrite:
        logger.warning("replacing %s (--overwrite): it held the results of another evaluation "
                       "(%s)", output, what)
    else:
        raise ConfigError(f"--output {output} holds the results of another evaluation ({what}); "
                          "choose another --output, or pass --overwrite to replace them "
                          "(nothing was written)")


def inherit_run_config(cfg: EvalArgs, run_cfg: dict[str, Any]) -> EvalArgs:
    """Fill base model, size, prompt format and max length from the adapter's run config where
    the user gave none; log each inherited value and each override."""
    explicit = explicit_fields(cfg)
    trained_size = run_cfg.get("model_size")
    if "model_size" in explicit and trained_size and get_spec(trained_size).size != cfg.model_size:
        raise ConfigError(f"the adapter in {cfg.adapter_path} was trained as --model-size "
                          f"{trained_size}, not {cfg.model_size}; drop --model-size")
    if "batch_size" not in explicit:
        cfg.batch_size = EVAL_BATCH_SIZE  # resolve_config put the training batch size here
    for name in INHERITED_FIELDS:
        recorded = run_cfg.get(name)
        if name in explicit:
            if recorded is not None and recorded != getattr(cfg, name):
                logger.info("%s = %r (flag; the adapter's run_config.json says %r)", name,
                            getattr(cfg, name), recorded)
        elif recorded is not None:
            setattr(cfg, name, get_spec(recorded).size if name == "model_size" else recorded)
            logger.info("%s = %r (from the adapter's run_config.json)", name, recorded)
    if "max_length" not in explicit and not run_cfg.get("max_length"):
        cfg.max_length = get_spec(cfg.model_size).max_length
    trained_q = run_cfg.get("quantization")
    eval_q = "4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None
    if trained_q and trained_q != eval_q:
        logger.info("the adapter was trained on a %s base and is evaluated on a %s one; pass "
                    "--use-%s to evaluate it as trained", trained_q, eval_q or "unquantized",
                    trained_q)
    if run_cfg.get("trust_remote_code") and not cfg.trust_remote_code:
        logger.info("the adapter was trained with --trust-remote-code; it stays off here unless "
                    "you pass it")
    return cfg


def library_versions() -> dict[str, str]:

    return versions(CORE_LIBRARIES + ("rouge-score", "sacrebleu"))


def evaluation_order(examples: Sequence[Any]) -> list[Any]:
    """Round-robin over categories (sorted by name), each category in content-hash order: the
    same order on every run and whatever the file order, and any prefix covers all categories."""
    by_category: dict[str, list[Any]] = defaultdict(list)
    for ex in examples:
        by_category[ex.category].append(ex)
    for group in by_category.values():
        group.sort(key=lambda ex: (ex.content_hash, ex.line))
    ordered = []
    longest = max((len(g) for g in by_category.values()), default=0)
    for i in range(longest):
        for category in sorted(by_category):
            if i < len(by_category[category]):
                ordered.append(by_category[category][i])
    return ordered


def response_nll(model, tokenizer, features: Sequence[dict[str, Any]], *,
                 batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL in nats, supervised token count) per tokenized example, teacher-forced on the
    response tokens only (llama_loss.per_example_nll: the LM head runs on supervised positions
    only)."""

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return per_example_nll(model, features, pad, batch_size=batch_size)


def eval_dtype(name: str):
    """--dtype auto: float32 on a CPU, the best half precision on a GPU.

    On a CPU, bf16 greedy decoding is not batch-invariant: rounding differs with the padded
    batch shape, and near-tied logits then pick other tokens (measured here on the embedded
    model: 5 of 6 texts equal between --batch-size 16 and 1 in bf16, 6 of 6 in fp32), and fp32
    batched generation was not slower on a 2-core CPU (small per-token matmuls)."""
    import torch


    if name != "auto":
        return getattr(torch, name)
    return best_dtype("cuda") if torch.cuda.is_available() else torch.float32


def _adapter_config_problem(adapter_path: str) -> str | None:
    try:
        cfg = json.loads((Path(adapter_path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"adapter_config.json is not valid JSON ({type(e).__name__})"
    return None if isinstance(cfg, dict) else "adapter_config.json is not a JSON object"


def load_for_evaluation(cfg: EvalArgs, base_model_flag: str | None):
    """(model, tokenizer): llama_model.load_for_inference with a choice of dtype.

    Same checks and messages (an explicit --base-model that differs from the adapter's is an
    error; the adapter's own tokenizer is used when saved with it)."""
    from safetensors import SafetensorError


    run_cfg = read_run_config(cfg.adapter_path) if cfg.adapter_path else {}
    trained_on = run_cfg.get("base_model")
    if base_model_flag and trained_on and not same_base(base_model_flag, trained_on):
        raise ModelLoadError(f"the adapter in {cfg.adapter_path} was trained on {trained_on!r}, "
                             f"not {base_model_flag!r}; drop --base-model to use {trained_on!r}")
    name = resolve_base_model(cfg.model_size, cfg.base_model)
    try:
        if cfg.adapter_path and (Path(cfg.adapter_path) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(cfg.adapter_path))
            if tok.pad_token_id is None:  # as llama_model.load_tokenizer: masked, never trained on
                tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        else:
            tok = load_tokenizer(name, trust_remote_code=cfg.trust_remote_code)
        model = load_model(name, use_4bit=cfg.use_4bit, use_8bit=cfg.use_8bit,
                           trust_remote_code=cfg.trust_remote_code, dtype=eval_dtype(cfg.dtype))
        if cfg.adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, cfg.adapter_path, is_trainable=False)
    except ModelLoadError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as e:
        # e.g. peft's "size mismatch for ...lora_A.weight": an adapter made for another
        # architecture under the same name; or adapter weights damaged after the header check.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelLoadError(f"could not load {cfg.adapter_path or name} onto {name!r}: {first}") from None
    model.eval()
    model.config.use_cache = True
    return model, tok


def _evaluate_pass(model, tok, prompts, features_by_hash, selected, cfg, *, label: str):
    """Generate and score one model (tuned or base) on the selected examples."""

    gen_stats: dict[str, Any] = {}
    logger.info("%s: generating %d responses (batch %d, up to %d new tokens)", label,
                len(prompts), cfg.batch_size, cfg.max_new_tokens)
    generations = generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, do_sample=cfg.do_sample,
                           temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                           progress=True, stats=gen_stats)
    t0 = time.perf_counter()
    hashes = list(features_by_hash)
    nll = response_nll(model, tok, [features_by_hash[h] for h in hashes], batch_size=cfg.batch_size)
    nll_by_hash = dict(zip(hashes, nll))
    ppl_seconds = time.perf_counter() - t0
    return generations, nll_by_hash, gen_stats, ppl_seconds


def _score_rows(selected, generations, nll_by_hash, answer_regex):

    rows = []
    for ex, gen in zip(selected, generations):
        nll, count = nll_by_hash.get(ex.content_hash, (None, 0))
        rows.append({
            "category": ex.category, "prediction": gen.text, "reference": ex.response,
            "metrics": score_example(gen.text, ex.response, answer_regex=answer_regex),
            "new_tokens": gen.new_tokens, "ended_with_eos": gen.ended_with_eos,
            "response_nll": nll, "response_tokens": count or None,
        })
    return rows


def _round(obj: Any, digits: int = 6) -> Any:
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, digits) for v in obj]
    return obj


def run_evaluate(cfg: EvalArgs) -> dict[str, Any]:
    """Evaluate; write the results JSON and samples JSONL; return the results (with paths)."""

    t_start = time.perf_counter()
    check_eval_config(cfg)
    run_cfg: dict[str, Any] = {}
    adapter_sha = None
    if cfg.adapter_path:
        run_cfg = read_run_config(cfg.adapter_path)
        weights = Path(cfg.adapter_path) / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ModelLoadError(f"--adapter-path {cfg.adapter_path}: no {ADAPTER_WEIGHTS} (this "
                                 "toolkit does not unpickle adapter_model.bin files it did not "
                                 "write); save the adapter with safe_serialization=True")
        problem = safetensors_problem(weights) or _adapter_config_problem(cfg.adapter_path)
        if problem:
            raise ModelLoadError(f"--adapter-path {cfg.adapter_path}: {problem}; point it at an "
                                 "intact final_model/ or checkpoint-*/ folder")
        adapter_sha = sha256_file(weights)
        if not run_cfg:
            logger.warning("%s has no run_config.json: using --base-model/--model-size and "
                           "--prompt-format as given", cfg.adapter_path)
    else:
        logger.info("no --adapter-path: evaluating the base model alone")
    base_model_flag = cfg.base_model if "base_model" in explicit_fields(cfg) else None
    inherit_run_config(cfg, run_cfg)
    base_name = resolve_base_model(cfg.model_size, cfg.base_model)
    if cfg.base_model is None:
        cfg.base_model = base_name

    examples, load_stats = load_and_validate(cfg.dataset, field_map=cfg.field_map,
                                             skip_invalid=cfg.skip_invalid, what="--dataset")
    ordered = evaluation_order(examples)
    selected = ordered[: cfg.num_samples] if cfg.num_samples else ordered
    if cfg.num_samples and cfg.num_samples > len(ordered):
        logger.info("--num-samples %d > %d examples: evaluating all", cfg.num_samples, len(ordered))
    dataset_sha = file_sha256(cfg.dataset)
    check_earlier_results(cfg, base_model=base_name, adapter_sha=adapter_sha,
                          dataset_sha=dataset_sha)
    trained_sha = (run_cfg.get("dataset") or {}).get("file_sha256")
    if trained_sha and trained_sha == dataset_sha:
        logger.warning("--dataset %s is the file the adapter was trained on: these metrics are "
                       "not a held-out evaluation", cfg.dataset)

    t0 = time.perf_counter()
    model, tok = load_for_evaluation(cfg, base_model_flag)
    load_seconds = time.perf_counter() - t0
    fmt = resolve_prompt_format(tok, cfg.prompt_format)
    prompts = [render_prompt(tok, fmt, ex.instruction, ex.context) for ex in selected]
    features = tokenize_examples(selected, tok, max_length=cfg.max_length, prompt_format=fmt)
    features_by_hash = {f["content_hash"]: f for f in features}
    if len(features_by_hash) < len({ex.content_hash for ex in selected}):
        logger.warning("%d example(s) have no room for the response within --max-length %d: no "
                       "perplexity for them", len({ex.content_hash for ex in selected})
                       - len(features_by_hash), cfg.max_length)

    generations, nll, gen_stats, ppl_seconds = _evaluate_pass(
        model, tok, prompts, features_by_hash, selected, cfg,
        label="tuned" if cfg.adapter_path else "base")
    rows = _score_rows(selected, generations, nll, cfg.answer_regex)
    metrics = aggregate(rows, by="category")

    base = None
    if cfg.compare_base:
        with model.disable_adapter():
            base_gens, base_nll, base_stats, base_ppl_seconds = _evaluate_pass(
                model, tok, prompts, features_by_hash, selected, cfg, label="base")
        base_rows = _score_rows(selected, base_gens, base_nll, cfg.answer_regex)
        base = {"rows": base_rows, "gens": base_gens, "metrics": aggregate(base_rows, by="category"),
                "stats": base_stats, "ppl_seconds": base_ppl_seconds}

    output = Path(cfg.output)
    samples_path = Path(cfg.samples_output) if cfg.samples_output else output.with_name(
        f"{output.stem}_samples.jsonl")
    sample_lines = []
    for i, (ex, prompt, gen, row) in enumerate(zip(selected, prompts, generations, rows)):
        record: dict[str, Any] = {
            "index": i, "id": ex.id, "category": ex.category, "prompt": prompt,
            "reference": ex.response, "generation": gen.text, "new_tokens": gen.new_tokens,
            "ended_with_eos": gen.ended_with_eos, "metrics": row["metrics"],
            "response_tokens": row["response_tokens"],
            "response_perplexity": (perplexity(row["response_nll"] / row["response_tokens"])
                                    if row["response_tokens"] else None),
        }
        if cfg.answer_regex:
            record["answer"] = extract_answer(gen.text, cfg.answer_regex)
            record["reference_answer"] = extract_answer(ex.response, cfg.answer_regex)
        if base is not None:
            brow, bgen = base["rows"][i], base["gens"][i]
            record.update(base_generation=bgen.text, base_new_tokens=bgen.new_tokens,
                          base_ended_with_eos=bgen.ended_with_eos, base_metrics=brow["metrics"],
                          base_response_perplexity=(
                              perplexity(brow["response_nll"] / brow["response_tokens"])
                              if brow["response_tokens"] else None))
            if cfg.answer_regex:
                record["base_answer"] = extract_answer(bgen.text, cfg.answer_regex)
        sample_lines.append(json.dumps(_round(record), ensure_ascii=False))

    total_seconds = time.perf_counter() - t_start
    gen_seconds = gen_stats.get("seconds", 0.0)
    param = next(model.parameters())
    adapter_cfg = {}
    if cfg.adapter_path:
        try:
            raw = json.loads((Path(cfg.adapter_path) / "adapter_config.json").read_text())
            adapter_cfg = {k: raw.get(k) for k in ("peft_type", "r", "lora_alpha", "lora_dropout",
                                                   "target_modules")}
            if isinstance(adapter_cfg["target_modules"], list):
                adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])
        except (OSError, ValueError):
            pass
    result: dict[str, Any] = {
        "stage": "evaluate",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in config_to_dict(cfg).items() if k not in UNUSED_FIELDS},
        "model": {
            "base_model": base_name, "model_size": cfg.model_size,
            "adapter_path": cfg.adapter_path, "adapter_sha256": adapter_sha,
            "adapter_config": adapter_cfg or None,
            "trained_base_model": run_cfg.get("base_model"),
            "trained_quantization": run_cfg.get("quantization"),
            "quantization": "4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None,
            "dtype": str(param.dtype).replace("torch.", ""), "device": str(param.device),
        },
        "dataset": {
            "path": cfg.dataset, "file_sha256": dataset_sha,
            "dataset_hash": dataset_hash(examples),
            "evaluated_hash": dataset_hash(selected),
            "examples_in_file": len(examples), "examples_evaluated": len(selected),
            "skipped_invalid": load_stats.skipped_invalid,
            "categories": dict(sorted(Counter(ex.category for ex in selected).items())),
            "same_file_as_training": bool(trained_sha and trained_sha == dataset_sha),
            "order": "round-robin over categories, each in content-hash order",
        },
        "prompt_format": fmt,
        "metrics": metrics,
        "timing": {
            "total_seconds": total_seconds, "load_seconds": load_seconds,
            "generation_seconds": gen_seconds,
            "generated_tokens": gen_stats.get("generated_tokens", 0),
            "tokens_per_second": gen_stats.get("tokens_per_second", 0.0),
            "examples_per_second": len(selected) / gen_seconds if gen_seconds else None,
            "perplexity_seconds": ppl_seconds,
        },
        "outputs": {"results": str(output), "samples": str(samples_path)},
        "library_versions": library_versions(),
    }
    if base is not None:
        result["base_metrics"] = base["metrics"]
        result["deltas"] = deltas(metrics, base["metrics"])
        result["timing"].update(base_generation_seconds=base["stats"].get("seconds", 0.0),
                                base_perplexity_seconds=base["ppl_seconds"],
                                total_seconds=time.perf_counter() - t_start)
    result = _round(result)
    write_text_atomic(samples_path, "".join(line + "\n" for line in sample_lines))
    write_text_atomic(output, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    logger.info("wrote %s and %s", output, samples_path)
    return result


TABLE_COLUMNS = (("EM", "exact_match"), ("F1", "token_f1"), ("ROUGE-L", "rouge_l"),
                 ("BLEU", "bleu"), ("JSON", "json_field_accuracy"), ("ANSWER", "answer_exact_match"),
                 ("PPL", "perplexity"), ("LEN", "avg_new_tokens"), ("EOS", "eos_rate"))


def _cell(value: Any, key: str, signed: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if key in ("perplexity", "avg_new_tokens"):
        return f"{value:+.1f}" if signed else f"{value:.1f}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_table(result: dict[str, Any]) -> str:
    """A short readable table: one line per category and overall (with base and delta lines
    under each when --compare-base ran)."""
    m = result["model"]
    what = f"adapter {m['adapter_path']} on {m['base_model']}" if m["adapter_path"] else m["base_model"]
    lines = [f"Evaluation of {what}: {result['dataset']['examples_evaluated']} examples from "
             f"{result['dataset']['path']} ({result['prompt_format']} prompt format)"]
    head = f"{'category':<24}{'n':>5}" + "".join(f"{name:>9}" for name, _ in TABLE_COLUMNS)
    lines.append(head)
    lines.append("-" * len(head))
    groups = list(result["metrics"]["by_category"].items()) + [("overall", result["metrics"]["overall"])]
    base = result.get("base_metrics")
    delta = result.get("deltas")
    for name, summary in groups:
        lines.append(f"{name:<24}{summary['n']:>5}" + "".join(
            f"{_cell(summary.get(k), k):>9}" for _, k in TABLE_COLUMNS))
        if base is not None:
            b = base["overall"] if name == "overall" else base["by_category"].get(name, {})
            d = delta["overall"] if name == "overall" else delta["by_category"].get(name, {})
            lines.append(f"{'  base':<24}{'':>5}" + "".join(
                f"{_cell(b.get(k), k):>9}" for _, k in TABLE_COLUMNS))
            lines.append(f"{'  delta':<24}{'':>5}" + "".join(
                f"{_cell(d.get(k), k, signed=True):>9}" for _, k in TABLE_COLUMNS))
    t = result["timing"]
    lines.append("EM exact match, F1 token F1, JSON field accuracy, ANSWER answer-regex match, "
                 "PPL response perplexity, LEN generated tokens, EOS share that stopped.")
    lines.append(f"{t['generated_tokens']} tokens generated in {t['generation_seconds']:.1f} s "
                 f"({t['tokens_per_second']:.1f} tok/s); total {t['total_seconds']:.1f} s")
    lines.append(f"results: {result['outputs']['results']}   samples: {result['outputs']['samples']}")
    return "\n".join(lines)
