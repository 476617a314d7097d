"""The tokenized dataset cache (data/cache.py): the same rows as tokenize_examples, a hit that
tokenizes nothing, a miss on every change that changes the rows, a killed build never trusted, a
damaged cache rebuilt; and the other input formats' file:line / row errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llama_sft.data import cache as cache_mod
from llama_sft.data.cache import CacheSpec, open_or_build
from llama_sft.data.loader import load_examples
from llama_sft.data.prompts import resolve_prompt_format
from llama_sft.data.splits import dataset_hash, split_examples
from llama_sft.data.tokenize import TokenizeStats, tokenize_examples
from llama_sft.errors import DatasetError
from tests.template_tokenizers import chatml_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sft_output" / "sft_dataset.jsonl"
MULTITURN = ROOT / "sft_output" / "chat_multiturn.jsonl"
GOLDEN = ROOT / "sft_output" / "golden_set.jsonl"


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


def spec(tok, path, cache_dir, **kw) -> CacheSpec:
    kw.setdefault("max_length", 96)
    return CacheSpec(dataset=str(path), tokenizer=tok, prompt_format=resolve_prompt_format(
        tok, "auto"), cache_dir=cache_dir, **kw)


@pytest.mark.parametrize("path,label_mode", [(SAMPLE, "all"), (MULTITURN, "all"),
                                             (MULTITURN, "last")])
def test_cached_rows_equal_tokenize_examples(tok, tmp_path, path, label_mode):
    # max_length 96 truncates contexts and responses and drops earliest exchanges: every
    # fitting path is compared, with the golden set removed as training removes it.
    golden = load_examples(GOLDEN)
    cache = open_or_build(spec(tok, path, tmp_path, label_mode=label_mode))
    splits, removed = cache.split(val_ratio=0.05, test_ratio=0.05, golden=golden)
    examples = load_examples(path)
    ref_splits, ref_removed = split_examples(examples, val_ratio=0.05, test_ratio=0.05,
                                             golden=golden)
    assert removed == ref_removed
    assert cache.meta["dataset_hash"] == dataset_hash(examples)
    changed = 0
    for name in ("train", "val", "test"):
        stats = TokenizeStats()
        ref = tokenize_examples(ref_splits[name], tok, max_length=96,
                                prompt_format=cache.meta["parts"]["prompt_format"],
                                label_mode=label_mode, stats=stats)
        assert cache.training_rows(splits[name]).rows == ref
        assert cache.stats(splits[name]) == stats
        assert [e.to_dict() for e in cache.examples(splits[name])] == \
            [e.to_dict() for e in ref_splits[name]]
        changed += stats.context_truncated + stats.response_truncated + stats.exchanges_dropped
    assert changed > 0  # the comparison covered truncation


def test_hit_tokenizes_nothing_and_changes_miss(tok, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_bytes(SAMPLE.read_bytes()[:200_000].rsplit(b"\n", 1)[0] + b"\n")
    first = open_or_build(spec(tok, data, tmp_path / "c"))
    assert not first.hit

    def no_tokenizing(*a, **k):
        raise AssertionError("a cache hit tokenized")

    monkeypatch.setattr(cache_mod, "fit_examples", no_tokenizing)
    again = open_or_build(spec(tok, data, tmp_path / "c"))
    assert again.hit and again.key == first.key
    monkeypatch.undo()
    keys = {first.key}
    for changed in (dict(max_length=80), dict(label_mode="last"),
                    dict(prompt_format="instruction")):
        s = spec(tok, data, tmp_path / "c")
        for k, v in changed.items():
            setattr(s, k, v)
        c = open_or_build(s)
        assert not c.hit and c.key not in keys, changed
        keys.add(c.key)
    other_tok = chatml_tokenizer()
    other_tok.add_tokens(["<extra_token>"])
    c = open_or_build(spec(other_tok, data, tmp_path / "c"))
    assert not c.hit and c.key not in keys
    with open(data, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"instruction": "one more", "response": "row"}) + "\n")
    c = open_or_build(spec(tok, data, tmp_path / "c"))
    assert not c.hit and c.rows == first.rows + 1


KILLED_BUILD = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from llama_sft.data import cache
from llama_sft.data.prompts import resolve_prompt_format
from tests.template_tokenizers import chatml_tokenizer
def dying(staging, final):
    # Every file is written; only the rename is left: the latest point a kill can come.
    open(sys.argv[4], "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
cache._rename_into_place = dying
tok = chatml_tokenizer()
cache.open_or_build(cache.CacheSpec(sys.argv[2], tok, resolve_prompt_format(tok, "auto"), 96,
                                    cache_dir=sys.argv[3]))
"""


def test_guarantee_19_a_build_killed_before_its_rename_is_never_used(tok, tmp_path):
    marker = tmp_path / "died"
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(ROOT), str(SAMPLE),
                           str(tmp_path / "c"), str(marker)], cwd=ROOT, capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL and marker.exists(), proc.stderr[-2000:]
    root = tmp_path / "c" / "tokenized"
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
    assert any(p.name.startswith(".") and ".tmp-" in p.name for p in root.iterdir())
    cache = open_or_build(spec(tok, SAMPLE, tmp_path / "c"))
    assert not cache.hit and cache.rows == len(load_examples(SAMPLE))


def test_guarantee_19_a_damaged_cache_is_rebuilt_with_a_warning(tok, tmp_path, caplog):
    first = open_or_build(spec(tok, MULTITURN, tmp_path))
    reference = first.training_rows(first.split(val_ratio=0.0, test_ratio=0.0)[0]["train"]).rows
    arrow = next((first.path / "data").glob("*.arrow"))
    del first
    with open(arrow, "r+b") as fh:
        fh.seek(0)
        fh.write(b"\0" * 64)
    caplog.set_level("WARNING", logger="llama_sft")
    logger = __import__("logging").getLogger("llama_sft")
    logger.propagate = True
    rebuilt = open_or_build(spec(tok, MULTITURN, tmp_path))
    assert not rebuilt.hit
    assert "damaged" in caplog.text
    assert rebuilt.training_rows(rebuilt.split(val_ratio=0.0, test_ratio=0.0)[0]["train"]) \
        .rows == reference


def test_bad_line_in_a_build_is_the_loaders_error(tok, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: invalid JSON"):
        open_or_build(spec(tok, data, tmp_path / "c"))
    assert not any((tmp_path / "c" / "tokenized").iterdir())  # the staging folder went too


# ---------------------------------------------------------------------------------------------
# Other input formats
# ---------------------------------------------------------------------------------------------

ROWS = [{"instruction": "Add 2 and 3.", "context": "", "response": "5", "category": "math"},
        {"instruction": "Name a colour.", "context": "", "response": "Blue", "category": "qa"},
        {"instruction": "Say hi.", "context": "", "response": "", "category": "qa"}]


def test_parquet_rows_and_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), good)
    assert [e.to_dict() for e in load_examples(good)] == [
        {k: v for k, v in r.items()} for r in ROWS[:2]]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), bad)
    with pytest.raises(DatasetError, match=r"bad.parquet: row 3: field 'response' is empty"):
        load_examples(bad)
    assert len(load_examples(bad, skip_invalid=True)) == 2


def test_csv_rows_and_bad_line_number(tmp_path):
    good = tmp_path / "d.csv"
    good.write_text('instruction,context,response,category\n"Add 2\nand 3.",,5,math\n'
                    'Name a colour.,,Blue,qa\nSay hi.,,,qa\n', encoding="utf-8")
    # The first record spans lines 2-3, so the bad one is on line 5, as an editor shows it.
    with pytest.raises(DatasetError, match=r"d.csv:5: field 'response' is empty"):
        load_examples(good)
    ex = load_examples(good, skip_invalid=True)
    assert [e.instruction for e in ex] == ["Add 2\nand 3.", "Name a colour."]
    assert ex[0].context == "" and ex[0].category == "math"


def test_csv_messages_column_is_json(tmp_path):
    f = tmp_path / "chat.csv"
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    import csv

    with open(f, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["messages"])
        w.writerow([json.dumps(turns)])
        w.writerow(["[not json"])
    with pytest.raises(DatasetError, match=r"chat.csv:3: field 'messages' must be JSON text"):
        load_examples(f)


def test_saved_folder_and_json_array(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS[:2]).save_to_disk(str(tmp_path / "saved"))
    assert [e.response for e in load_examples(tmp_path / "saved")] == ["5", "Blue"]
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(ROWS), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"a.json: row 3: field 'response' is empty"):
        load_examples(arr)


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match="hub cannot be reached"):
        load_examples("someone/some-dataset")


def test_prepare_prints_key_and_train_hits(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "llama_dataset.py", "--dataset", str(MULTITURN),
                          "--model-size", "135m", "--max-length", "128", "--prepare",
                          "--cache-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokenized cache built: key " in out.stdout
    key = out.stdout.split("key ")[1].split(",")[0]
    assert (tmp_path / "tokenized" / key / "meta.json").is_file()
    again = subprocess.run([sys.executable, "llama_dataset.py", "--dataset", str(MULTITURN),
                            "--model-size", "135m", "--max-length", "128", "--prepare",
                            "--cache-dir", str(tmp_path)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert f"tokenized cache already there: key {key}" in again.stdout


def test_guarantee_17_a_full_disk_during_a_cache_build_removes_it_and_keeps_other_caches(
        tok, tmp_path, monkeypatch, capsys):
    import errno

    import datasets

    import llama_dataset

    kept = open_or_build(spec(tok, MULTITURN, tmp_path / "c"))
    save = datasets.Dataset.save_to_disk

    def full(self, path, *a, **k):
        # Half the files written, then the error a full disk gives.
        save(self, path, *a, **k)
        next(Path(path).glob("*.arrow")).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    with pytest.raises(cache_mod.DiskFullError, match=r"tokenized dataset cache .*--cache-dir"):
        open_or_build(spec(tok, SAMPLE, tmp_path / "c"))
    root = tmp_path / "c" / "tokenized"
    assert sorted(p.name for p in root.iterdir()) == [kept.key]  # no staging left behind
    assert open_or_build(spec(tok, MULTITURN, tmp_path / "c")).hit  # the earlier cache intact
    # The command: exit 1 and the message on stderr.
    code = llama_dataset.main(["--dataset", str(SAMPLE), "--model-size", "135m", "--prepare",
                               "--max-length", "96", "--cache-dir", str(tmp_path / "c")])
    assert code == 1
    assert "not enough disk space to write the tokenized dataset cache" in capsys.readouterr().err
    monkeypatch.undo()
    built = open_or_build(spec(tok, SAMPLE, tmp_path / "c"))
    assert not built.hit and built.rows == len(load_examples(SAMPLE))


@pytest.mark.parametrize("path,label_mode", [(SAMPLE, "all"), (MULTITURN, "last")])
def test_report_from_the_cache_equals_the_streaming_report(tok, tmp_path, path, label_mode):
    # --prepare --report reads the report from the cache's columns; it must be the report the
    # streaming pass makes (max_length 96 so that truncation, drops and shortening are counted).
    from llama_sft.data.loader import LoadStats, iter_examples
    from llama_sft.data.report import build_report, report_from_cache

    golden = load_examples(GOLDEN)
    s = spec(tok, path, tmp_path, label_mode=label_mode)
    cache = open_or_build(s)
    stats = LoadStats()
    ref = build_report(iter_examples(str(path), stats=stats), tok, path=str(path), max_length=96,
                       prompt_format=s.prompt_format, val_ratio=0.1, test_ratio=0.1,
                       golden=golden, load_stats=stats, label_mode=label_mode)
    got = report_from_cache(cache, tok, path=str(path), val_ratio=0.1, test_ratio=0.1,
                            golden=golden)
    assert got == ref
    assert ref["would_truncate"] > 0  # the comparison covered the fitting counts
