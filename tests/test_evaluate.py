"""llama_evaluate: end to end on a tiny LoRA adapter (fast) and on the embedded model (slow)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import GOLDEN, make_adapter

import llama_evaluate
from llama_sft.config import EvalArgs
from llama_sft.evaluation.evaluate import evaluation_order, run_evaluate
from llama_sft.evaluation.metrics import GSM8K_ANSWER_REGEX, METRIC_NAMES
from llama_sft.files import sha256_file


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    # std 0.3: on the 64-wide random model, 0.02 does not change a single greedy token.
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("tiny_run") / "final_model",
                        lora_b_std=0.3)


@pytest.fixture(scope="module")
def evaluated(tiny_adapter, tmp_path_factory):
    """One evaluation with --compare-base and --answer-regex, shared by several tests."""
    out = tmp_path_factory.mktemp("eval") / "results.json"
    rc = llama_evaluate.main(["--adapter-path", str(tiny_adapter), "--dataset", str(GOLDEN),
                              "--output", str(out), "--num-samples", "6", "--max-new-tokens", "8",
                              "--answer-regex", GSM8K_ANSWER_REGEX, "--compare-base"])
    assert rc == 0
    samples = [json.loads(line) for line in out.with_name("results_samples.jsonl").read_text().splitlines()]
    return json.loads(out.read_text()), samples, out


def test_help_is_fast_and_works(capsys):
    with pytest.raises(SystemExit) as e:
        llama_evaluate.main(["--help"])
    assert e.value.code == 0
    assert "--compare-base" in capsys.readouterr().out


def test_end_to_end_results_and_samples(evaluated, tiny_adapter, tiny_llama_dir):
    result, samples, out = evaluated
    assert {"stage", "created", "config", "model", "dataset", "prompt_format", "metrics", "timing",
            "outputs", "library_versions", "base_metrics", "deltas"} <= set(result)
    model = result["model"]
    assert model["adapter_path"] == str(tiny_adapter)
    assert model["base_model"] == str(tiny_llama_dir)  # from run_config.json
    assert model["adapter_sha256"] == sha256_file(tiny_adapter / "adapter_model.safetensors")
    ds = result["dataset"]
    assert ds["path"] == str(GOLDEN) and ds["examples_in_file"] == 150 and ds["examples_evaluated"] == 6
    assert len(ds["file_sha256"]) == 64 and ds["dataset_hash"]
    # round-robin order: 6 samples cover the 6 categories
    assert sorted(ds["categories"]) == sorted({s["category"] for s in samples}) and len(ds["categories"]) == 6
    assert result["prompt_format"] == "chat" and result["config"]["max_length"] == 256
    assert result["config"]["batch_size"] == 16  # not the training batch size of the model size
    assert len(samples) == 6
    for s in samples:
        assert {"id", "category", "prompt", "reference", "generation", "metrics", "new_tokens",
                "ended_with_eos", "response_perplexity", "base_generation", "base_metrics"} <= set(s)
        assert s["prompt"].startswith("<|im_start|>")  # the chat template, as in training
        assert s["new_tokens"] <= 8
    overall = result["metrics"]["overall"]
    assert overall["n"] == 6
    for name in METRIC_NAMES + ("eos_rate", "corpus_bleu"):
        if overall.get(name) is not None:
            assert 0.0 <= overall[name] <= 1.0, name
    assert overall["perplexity"] > 1.0 and overall["avg_new_tokens"] > 0
    assert set(result["metrics"]["by_category"]) == set(ds["categories"])
    # answer_exact_match applies to the math example only; JSON metrics to the extraction one
    assert overall["scored"]["answer_exact_match"] == 1 and overall["scored"]["json_field_accuracy"] == 1
    assert result["timing"]["generated_tokens"] > 0 and result["timing"]["tokens_per_second"] > 0


def test_compare_base_reports_base_metrics_and_deltas(evaluated):
    result, samples, _ = evaluated
    base, tuned, delta = result["base_metrics"], result["metrics"], result["deltas"]
    assert base["overall"]["n"] == 6
    for key in ("exact_match", "token_f1", "perplexity", "avg_new_tokens"):
        assert delta["overall"][key] == pytest.approx(tuned["overall"][key] - base["overall"][key],
                                                      abs=1e-5)
    assert set(delta["by_category"]) == set(tuned["by_category"])
    # the adapter really changes the model: generations and perplexities differ from the base
    assert any(s["generation"] != s["base_generation"] for s in samples)
    assert tuned["overall"]["perplexity"] != base["overall"]["perplexity"]


def test_table_is_printed(tiny_adapter, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert llama_evaluate.main(["--adapter-path", str(tiny_adapter), "--dataset", str(GOLDEN),
                                "--output", str(out), "--num-samples", "2",
                                "--max-new-tokens", "2", "--samples-output",
                                str(tmp_path / "s.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "overall" in text and "EM" in text and "ROUGE-L" in text
    assert (tmp_path / "s.jsonl").is_file() and not (tmp_path / "r_samples.jsonl").exists()


def test_batched_generation_equals_one_at_a_time(tiny_adapter, tmp_path):
    """--batch-size 16 (left-padded batches) and --batch-size 1 give the same greedy texts."""
    from llama_sft.cli import setup_logging

    setup_logging()  # an earlier main() may have bound the log handler to a closed capture
    texts = {}
    ppl = {}
    for batch_size in (16, 1):
        out = tmp_path / f"b{batch_size}.json"
        cfg = EvalArgs(adapter_path=str(tiny_adapter), dataset=str(GOLDEN),
                                      output=str(out), num_samples=8, max_new_tokens=12,
                                      batch_size=batch_size)
        result = run_evaluate(cfg)  # run_* directly, as the pilot would
        assert result["config"]["batch_size"] == batch_size
        rows = [json.loads(x) for x in out.with_name(f"b{batch_size}_samples.jsonl").read_text().splitlines()]
        texts[batch_size] = [r["generation"] for r in rows]
        ppl[batch_size] = [r["response_perplexity"] for r in rows]
    assert texts[16] == texts[1]
    assert len(set(texts[1])) > 1  # not a degenerate constant output
    assert result["model"]["dtype"] == "float32"  # --dtype auto on a CPU
    # perplexity batches are right-padded; fp32 sums over other shapes differ in the last bits
    assert ppl[16] == pytest.approx(ppl[1], rel=1e-4)


def test_field_map_and_answer_regex_on_gsm8k_shaped_data(tiny_adapter, tmp_path):
    """GSM8K rows (question/answer) through --field-map; answers compared after extraction."""
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 4 more. How many apples?",
             "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "A box holds 1,200 pins. How many pins are in 2 boxes?",
             "answer": "2 * 1200 = 2400\n#### 2,400"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gsm.json"
    assert llama_evaluate.main(["--adapter-path", str(tiny_adapter), "--dataset", str(data),
                                "--field-map", "question=instruction,answer=response",
                                "--answer-regex", GSM8K_ANSWER_REGEX, "--output", str(out),
                                "--max-new-tokens", "4"]) == 0
    samples = [json.loads(x) for x in out.with_name("gsm_samples.jsonl").read_text().splitlines()]
    assert sorted(s["reference_answer"] for s in samples) == ["2,400", "7"]
    result = json.loads(out.read_text())
    assert result["metrics"]["by_category"]["uncategorized"]["n"] == 2
    assert result["metrics"]["overall"]["answer_exact_match"] == 0.0  # a random model


def test_evaluation_order_is_round_robin_and_file_order_independent():
    from llama_sft.data.loader import load_and_validate

    examples, _ = load_and_validate(str(GOLDEN))
    order = evaluation_order(examples)
    assert len(order) == len(examples)
    assert len({ex.category for ex in order[:6]}) == 6
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)
    assert [ex.id for ex in evaluation_order(shuffled)] == [ex.id for ex in order]


# ---------------------------------------------------------------- bad input: exit 2, one line


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return err[err.index("error:"):]


def test_base_model_mismatch_is_a_clean_error(tiny_adapter, tmp_path, capsys):
    rc = llama_evaluate.main(["--base-model", "smollm2-135m", "--adapter-path", str(tiny_adapter),
                              "--dataset", str(GOLDEN), "--output", str(tmp_path / "r.json")])
    assert rc == 2
    msg = _error(capsys)
    assert "trained on" in msg and "smollm2-135m" in msg
    assert not (tmp_path / "r.json").exists()
    rc = llama_evaluate.main(["--model-size", "7b", "--adapter-path", str(tiny_adapter),
                              "--dataset", str(GOLDEN), "--output", str(tmp_path / "r.json")])
    assert rc == 2
    assert "trained as --model-size 135m" in _error(capsys)


def test_missing_adapter_is_a_clean_error(tmp_path, capsys):
    rc = llama_evaluate.main(["--adapter-path", str(tmp_path / "nope"), "--dataset", str(GOLDEN),
                              "--output", str(tmp_path / "r.json")])
    assert rc == 2
    assert "no such folder" in _error(capsys)


def test_adapter_without_safetensors_is_refused(tiny_adapter, tmp_path, capsys):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_adapter, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    rc = llama_evaluate.main(["--adapter-path", str(folder), "--dataset", str(GOLDEN),
                              "--output", str(tmp_path / "r.json")])
    assert rc == 2
    assert "adapter_model.safetensors" in _error(capsys)


def test_empty_dataset_is_a_clean_error(tiny_adapter, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc = llama_evaluate.main(["--adapter-path", str(tiny_adapter), "--dataset", str(empty),
                              "--output", str(tmp_path / "r.json")])
    assert rc == 2
    assert "no valid examples" in _error(capsys)


def test_missing_dataset_is_a_clean_error(tiny_adapter, tmp_path, capsys):
    rc = llama_evaluate.main(["--adapter-path", str(tiny_adapter), "--dataset",
                              str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "r.json")])
    assert rc == 2
    assert "file not found" in _error(capsys)


def test_config_problems_are_reported_together(tiny_adapter, tmp_path, capsys):
    rc = llama_evaluate.main(["--dataset", str(GOLDEN), "--output", str(tmp_path / "r.json"),
                              "--compare-base", "--answer-regex", "(", "--num-samples", "0"])
    assert rc == 2
    msg = _error(capsys)
    assert "--compare-base needs --adapter-path" in msg and "--answer-regex" in msg
    assert "--num-samples" in msg


# ---------------------------------------------------------------- embedded model (slow)


@pytest.mark.slow
def test_embedded_model_end_to_end(embedded_model_dir, tmp_path, capsys):
    adapter = make_adapter(embedded_model_dir, tmp_path / "final_model", lora_b_std=0.02,
                           base_model="smollm2-135m")
    out = tmp_path / "evaluation_results.json"
    rc = llama_evaluate.main(["--base-model", "smollm2-135m", "--adapter-path", str(adapter),
                              "--dataset", str(GOLDEN), "--output", str(out), "--num-samples", "6",
                              "--max-new-tokens", "24", "--compare-base",
                              "--answer-regex", GSM8K_ANSWER_REGEX])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"]["base_model"] == "smollm2-135m"
    overall = result["metrics"]["overall"]
    # a real instruct model: perplexity on the references is far below the vocabulary size
    assert 1.0 < overall["perplexity"] < 1000
    assert "deltas" in result and "overall" in capsys.readouterr().out
