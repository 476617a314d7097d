"""The evaluation stage behind llama_evaluate.py: check inputs, inherit the adapter's run config,
generate and score the tuned (and with --compare-base the base) model, write the results JSON and
samples JSONL, and format the summary table.

    python3 llama_evaluate.py --adapter-path ./training_output/final_model \
        --dataset ./sft_output/golden_set.jsonl --output ./evaluation_results.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
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
from llama_sft.data.prompts import generation_prompt, resolve_prompt_format
from llama_sft.data.splits import dataset_hash
from llama_sft.data.tokenize import tokenize_examples
from llama_sft.errors import ConfigError, ModelLoadError
from llama_sft.evaluation.generate import Generation, generate, run_stop_ids
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
from llama_sft.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunConfig
from llama_sft.modeling.load import (
    inference_dtype,
    load_for_inference,
    read_run_config,
    resolve_base_model,
)
from llama_sft.modeling.loss import per_example_nll
from llama_sft.modeling.merge import generation_model, generation_route
from llama_sft.versions import CORE_LIBRARIES, library_versions

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


def inherit_run_config(cfg: EvalArgs, run: RunConfig) -> EvalArgs:
    """Fill base model, size, prompt format and max length from the adapter's run config where
    the user gave none; log each inherited value and each override."""
    explicit = explicit_fields(cfg)
    if ("model_size" in explicit and run.model_size
            and get_spec(run.model_size).size != cfg.model_size):
        raise ConfigError(f"the adapter in {cfg.adapter_path} was trained as --model-size "
                          f"{run.model_size}, not {cfg.model_size}; drop --model-size")
    if "batch_size" not in explicit:
        cfg.batch_size = EVAL_BATCH_SIZE  # resolve_config put the training batch size here
    for name in INHERITED_FIELDS:
        recorded = getattr(run, name)
        if name in explicit:
            if recorded is not None and recorded != getattr(cfg, name):
                logger.info("%s = %r (flag; the adapter's run_config.json says %r)", name,
                            getattr(cfg, name), recorded)
        elif recorded is not None:
            setattr(cfg, name, get_spec(recorded).size if name == "model_size" else recorded)
            logger.info("%s = %r (from the adapter's run_config.json)", name, recorded)
    if "max_length" not in explicit and not run.max_length:
        cfg.max_length = get_spec(cfg.model_size).max_length
    eval_q = "4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None
    if run.quantization and run.quantization != eval_q:
        logger.info("the adapter was trained on a %s base and is evaluated on a %s one; pass "
                    "--use-%s to evaluate it as trained", run.quantization,
                    eval_q or "unquantized", run.quantization)
    if run.trust_remote_code and not cfg.trust_remote_code:
        logger.info("the adapter was trained with --trust-remote-code; it stays off here unless "
                    "you pass it")
    return cfg


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
    response tokens only (modeling.loss.per_example_nll: the LM head runs on supervised positions
    only)."""
    return per_example_nll(model, features, tokenizer.pad_token_id, batch_size=batch_size)


def _adapter_config_problem(adapter_path: str) -> str | None:
    try:
        cfg = json.loads((Path(adapter_path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"adapter_config.json is not valid JSON ({type(e).__name__})"
    return None if isinstance(cfg, dict) else "adapter_config.json is not a JSON object"


def load_for_evaluation(cfg: EvalArgs, base_model_flag: str | None):
    """(model, tokenizer): load_for_inference in the --dtype asked for.

    Same checks and messages (an explicit --base-model that differs from the adapter's is an
    error; the adapter's own tokenizer is used when saved with it). An adapter that does not
    load onto the base is bad input here (ModelLoadError), where verification calls it a failure."""
    from safetensors import SafetensorError

    try:
        model, tok, _ = load_for_inference(
            adapter_path=cfg.adapter_path, base_model=base_model_flag, model_size=cfg.model_size,
            use_4bit=cfg.use_4bit, use_8bit=cfg.use_8bit,
            trust_remote_code=cfg.trust_remote_code, dtype=inference_dtype(cfg.dtype))
    except ModelLoadError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as e:
        # e.g. peft's "size mismatch for ...lora_A.weight": an adapter made for another
        # architecture under the same name; or adapter weights damaged after the header check.
        name = resolve_base_model(cfg.model_size, cfg.base_model)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelLoadError(f"could not load {cfg.adapter_path or name} onto {name!r}: "
                             f"{first}") from None
    return model, tok


@dataclass
class EvalData:
    """The --dataset as read, and the examples this run evaluates (in evaluation order)."""

    examples: list[Any]
    skipped_invalid: int
    selected: list[Any]
    file_sha256: str
    same_file_as_training: bool


@dataclass
class PassResult:
    """One model (tuned or base) generated and scored on the selected examples."""

    generations: list[Generation]
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    stats: dict[str, Any]  # generate()'s generated_tokens, seconds, tokens_per_second
    ppl_seconds: float


def check_adapter(cfg: EvalArgs) -> tuple[RunConfig, str | None]:
    """(the adapter's run config, sha256 of its weights); an empty RunConfig and None without
    --adapter-path. Missing or damaged weights are refused before anything is loaded."""
    if not cfg.adapter_path:
        logger.info("no --adapter-path: evaluating the base model alone")
        return RunConfig(), None
    recorded = read_run_config(cfg.adapter_path)
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
    if not recorded:
        logger.warning("%s has no run_config.json: using --base-model/--model-size and "
                       "--prompt-format as given", cfg.adapter_path)
    return RunConfig.from_dict(recorded), adapter_sha


def resolve_models(cfg: EvalArgs, run: RunConfig) -> tuple[str | None, str]:
    """(the --base-model the user gave, or None; the base model name the results record).
    Fills cfg from the run config, so cfg.base_model is set afterwards."""
    base_model_flag = cfg.base_model if "base_model" in explicit_fields(cfg) else None
    inherit_run_config(cfg, run)
    base_name = resolve_base_model(cfg.model_size, cfg.base_model)
    if cfg.base_model is None:
        cfg.base_model = base_name
    return base_model_flag, base_name


def load_eval_data(cfg: EvalArgs, run: RunConfig, *, base_name: str,
                   adapter_sha: str | None) -> EvalData:
    """Read and validate --dataset, pick the first --num-samples in evaluation order, and
    refuse an --output that holds another evaluation (still before the model loads)."""
    examples, load_stats = load_and_validate(cfg.dataset, field_map=cfg.field_map,
                                             skip_invalid=cfg.skip_invalid, what="--dataset")
    ordered = evaluation_order(examples)
    selected = ordered[: cfg.num_samples] if cfg.num_samples else ordered
    if cfg.num_samples and cfg.num_samples > len(ordered):
        logger.info("--num-samples %d > %d examples: evaluating all", cfg.num_samples, len(ordered))
    dataset_sha = file_sha256(cfg.dataset)
    check_earlier_results(cfg, base_model=base_name, adapter_sha=adapter_sha,
                          dataset_sha=dataset_sha)
    trained_sha = (run.dataset or {}).get("file_sha256")
    same_file = bool(trained_sha and trained_sha == dataset_sha)
    if same_file:
        logger.warning("--dataset %s is the file the adapter was trained on: these metrics are "
                       "not a held-out evaluation", cfg.dataset)
    return EvalData(examples=examples, skipped_invalid=load_stats.skipped_invalid,
                    selected=selected, file_sha256=dataset_sha, same_file_as_training=same_file)


def prepare_inputs(tok, cfg: EvalArgs, selected: Sequence[Any]):
    """(prompt format, rendered prompts, tokenized examples by content hash) for `selected`.

    A conversation is scored on its last assistant turn: the prompt is the history before it
    (as trained) and the perplexity covers that turn alone."""
    fmt = resolve_prompt_format(tok, cfg.prompt_format)
    prompts = [generation_prompt(tok, fmt, ex) for ex in selected]
    features = tokenize_examples(selected, tok, max_length=cfg.max_length, prompt_format=fmt,
                                 label_mode="last")
    features_by_hash = {f["content_hash"]: f for f in features}
    wanted = len({ex.content_hash for ex in selected})
    if len(features_by_hash) < wanted:
        logger.warning("%d example(s) have no room for the response within --max-length %d: no "
                       "perplexity for them", wanted - len(features_by_hash), cfg.max_length)
    return fmt, prompts, features_by_hash


def evaluate_pass(model, tok, prompts, features_by_hash, selected, cfg, *,
                  label: str, stop_ids: Sequence[int] | None = None) -> PassResult:
    """Generate and score one model (tuned, or the base inside peft's disable_adapter) on the
    selected examples. Generation goes through modeling/merge.py's plain copy where it fits
    (adapter merged, bitsandbytes weights de-quantized: the tuned model generates at its base's
    speed); the perplexity through `model` itself."""
    gen_stats: dict[str, Any] = {}
    logger.info("%s: generating %d responses (batch %d, up to %d new tokens)", label,
                len(prompts), cfg.batch_size, cfg.max_new_tokens)
    with generation_model(model) as gen_model:
        gen_stats["through"] = generation_route(model, gen_model)
        generations = generate(gen_model, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size, do_sample=cfg.do_sample,
                               temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                               progress=True, stats=gen_stats, stop_ids=stop_ids)
    t0 = time.perf_counter()
    hashes = list(features_by_hash)
    nll = response_nll(model, tok, [features_by_hash[h] for h in hashes], batch_size=cfg.batch_size)
    ppl_seconds = time.perf_counter() - t0
    rows = _score_rows(selected, generations, dict(zip(hashes, nll)), cfg.answer_regex)
    metrics = aggregate(rows, by="category")
    if any(ex.messages is not None for ex in selected):
        metrics["by_assistant_turns"] = aggregate(rows, by="assistant_turns")["by_assistant_turns"]
    return PassResult(generations=generations, rows=rows, metrics=metrics,
                      stats=gen_stats, ppl_seconds=ppl_seconds)


def evaluate_models(model, tok, prompts, features_by_hash, selected, cfg: EvalArgs,
                    stop_ids: Sequence[int] | None = None) -> tuple[PassResult, PassResult | None]:
    """The tuned model's pass, and with --compare-base the base model's (adapter disabled);
    both stop at `stop_ids` (default: the model's own, llama_sft.data.prompts.stop_token_ids)."""
    tuned = evaluate_pass(model, tok, prompts, features_by_hash, selected, cfg,
                          label="tuned" if cfg.adapter_path else "base", stop_ids=stop_ids)
    base = None
    if cfg.compare_base:
        with model.disable_adapter():
            base = evaluate_pass(model, tok, prompts, features_by_hash, selected, cfg,
                                 label="base", stop_ids=stop_ids)
    return tuned, base


def _score_rows(selected, generations, nll_by_hash, answer_regex):
    rows = []
    for ex, gen in zip(selected, generations):
        nll, count = nll_by_hash.get(ex.content_hash, (None, 0))
        rows.append({
            "category": ex.category, "assistant_turns": ex.assistant_turns,
            "prediction": gen.text, "reference": ex.response,
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


def _response_perplexity(row: dict[str, Any]) -> float | None:
    if not row["response_tokens"]:
        return None
    return perplexity(row["response_nll"] / row["response_tokens"])


def sample_lines(cfg: EvalArgs, selected, prompts, tuned: PassResult,
                 base: PassResult | None) -> list[str]:
    """One JSON line per evaluated example for the samples file."""
    lines = []
    for i, (ex, prompt, gen, row) in enumerate(zip(selected, prompts, tuned.generations,
                                                   tuned.rows)):
        record: dict[str, Any] = {
            "index": i, "id": ex.id, "category": ex.category,
            "assistant_turns": ex.assistant_turns, "prompt": prompt,
            "reference": ex.response, "generation": gen.text, "new_tokens": gen.new_tokens,
            "ended_with_eos": gen.ended_with_eos, "metrics": row["metrics"],
            "response_tokens": row["response_tokens"],
            "response_perplexity": _response_perplexity(row),
        }
        if cfg.answer_regex:
            record["answer"] = extract_answer(gen.text, cfg.answer_regex)
            record["reference_answer"] = extract_answer(ex.response, cfg.answer_regex)
        if base is not None:
            brow, bgen = base.rows[i], base.generations[i]
            record.update(base_generation=bgen.text, base_new_tokens=bgen.new_tokens,
                          base_ended_with_eos=bgen.ended_with_eos, base_metrics=brow["metrics"],
                          base_response_perplexity=_response_perplexity(brow))
            if cfg.answer_regex:
                record["base_answer"] = extract_answer(bgen.text, cfg.answer_regex)
        lines.append(json.dumps(_round(record), ensure_ascii=False))
    return lines


def adapter_summary(adapter_path: str | None) -> dict[str, Any] | None:
    """The LoRA settings from adapter_config.json (None without an adapter or when unreadable)."""
    if not adapter_path:
        return None
    try:
        raw = json.loads((Path(adapter_path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    summary = {k: raw.get(k) for k in ("peft_type", "r", "lora_alpha", "lora_dropout",
                                       "target_modules")}
    if isinstance(summary["target_modules"], list):
        summary["target_modules"] = sorted(summary["target_modules"])
    return summary


def model_info(cfg: EvalArgs, model, run: RunConfig, *, base_name: str,
               adapter_sha: str | None) -> dict[str, Any]:
    param = next(model.parameters())
    return {
        "base_model": base_name, "model_size": cfg.model_size,
        "adapter_path": cfg.adapter_path, "adapter_sha256": adapter_sha,
        "adapter_config": adapter_summary(cfg.adapter_path),
        "trained_base_model": run.base_model,
        "trained_quantization": run.quantization,
        "quantization": "4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None,
        "dtype": str(param.dtype).replace("torch.", ""), "device": str(param.device),
    }


def dataset_info(cfg: EvalArgs, data: EvalData) -> dict[str, Any]:
    return {
        "path": cfg.dataset, "file_sha256": data.file_sha256,
        "dataset_hash": dataset_hash(data.examples),
        "evaluated_hash": dataset_hash(data.selected),
        "examples_in_file": len(data.examples), "examples_evaluated": len(data.selected),
        "skipped_invalid": data.skipped_invalid,
        "categories": dict(sorted(Counter(ex.category for ex in data.selected).items())),
        "same_file_as_training": data.same_file_as_training,
        "order": "round-robin over categories, each in content-hash order",
    }


def assemble_results(cfg: EvalArgs, *, model: dict[str, Any], dataset: dict[str, Any],
                     prompt_format: str, tuned: PassResult, base: PassResult | None,
                     t_start: float, load_seconds: float) -> dict[str, Any]:
    """The results JSON (rounded), as written to --output."""
    gen_seconds = tuned.stats.get("seconds", 0.0)
    result: dict[str, Any] = {
        "stage": "evaluate",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in config_to_dict(cfg).items() if k not in UNUSED_FIELDS},
        "model": model,
        "dataset": dataset,
        "prompt_format": prompt_format,
        "metrics": tuned.metrics,
        "timing": {
            "total_seconds": time.perf_counter() - t_start, "load_seconds": load_seconds,
            "generation_seconds": gen_seconds,
            "generated_tokens": tuned.stats.get("generated_tokens", 0),
            "tokens_per_second": tuned.stats.get("tokens_per_second", 0.0),
            "examples_per_second": len(tuned.rows) / gen_seconds if gen_seconds else None,
            "perplexity_seconds": tuned.ppl_seconds,
            "generated_through": tuned.stats.get("through"),
            "ms_per_decode_step": tuned.stats.get("ms_per_decode_step"),
        },
        "outputs": {"results": str(Path(cfg.output)), "samples": str(samples_path_for(cfg))},
        "library_versions": library_versions(CORE_LIBRARIES + ("rouge-score", "sacrebleu")),
    }
    if base is not None:
        result["base_metrics"] = base.metrics
        result["deltas"] = deltas(tuned.metrics, base.metrics)
        result["timing"].update(base_generation_seconds=base.stats.get("seconds", 0.0),
                                base_tokens_per_second=base.stats.get("tokens_per_second", 0.0),
                                base_ms_per_decode_step=base.stats.get("ms_per_decode_step"),
                                base_perplexity_seconds=base.ppl_seconds,
                                total_seconds=time.perf_counter() - t_start)
    return _round(result)


def write_outputs(cfg: EvalArgs, result: dict[str, Any], samples: Sequence[str]) -> None:
    output, samples_path = Path(cfg.output), samples_path_for(cfg)
    write_text_atomic(samples_path, "".join(line + "\n" for line in samples))
    write_text_atomic(output, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    logger.info("wrote %s and %s", output, samples_path)


def run_evaluate(cfg: EvalArgs) -> dict[str, Any]:
    """Evaluate; write the results JSON and samples JSONL; return the results (with paths)."""
    t_start = time.perf_counter()
    check_eval_config(cfg)
    run, adapter_sha = check_adapter(cfg)
    base_model_flag, base_name = resolve_models(cfg, run)
    data = load_eval_data(cfg, run, base_name=base_name, adapter_sha=adapter_sha)

    t0 = time.perf_counter()
    model, tok = load_for_evaluation(cfg, base_model_flag)
    load_seconds = time.perf_counter() - t0
    fmt, prompts, features_by_hash = prepare_inputs(tok, cfg, data.selected)
    stop_ids = run_stop_ids(run, fmt, model, tok)
    tuned, base = evaluate_models(model, tok, prompts, features_by_hash, data.selected, cfg,
                                  stop_ids=stop_ids)

    samples = sample_lines(cfg, data.selected, prompts, tuned, base)
    result = assemble_results(
        cfg, model=model_info(cfg, model, run, base_name=base_name, adapter_sha=adapter_sha),
        dataset=dataset_info(cfg, data), prompt_format=fmt, tuned=tuned, base=base,
        t_start=t_start, load_seconds=load_seconds)
    write_outputs(cfg, result, samples)
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
    if t.get("ms_per_decode_step") and t.get("base_ms_per_decode_step"):
        lines.append(f"decode step: tuned {t['ms_per_decode_step']:.1f} ms, base "
                     f"{t['base_ms_per_decode_step']:.1f} ms "
                     f"({t['base_ms_per_decode_step'] / t['ms_per_decode_step']:.2f}x the base's "
                     "speed, whatever the answers' length)")
    lines.append(f"results: {result['outputs']['results']}   samples: {result['outputs']['samples']}")
    return "\n".join(lines)
