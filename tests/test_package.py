"""llama_package: archive layout, checksums, safe verification, reload equality, merge, and no
secret in any file written. Fast tests use the tiny LLaMA as base model."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import GOLDEN, full_disk_open, make_adapter

import llama_evaluate
import llama_package
from llama_sft.config import PackageArgs
from llama_sft.files import sha256_file
from llama_sft.packaging.card import CARD_EXAMPLE, _prompt_builder_code
from llama_sft.packaging.metadata import scrub_paths
from llama_sft.packaging.package import run_package
from llama_sft.packaging.verify import run_verify

CANARIES = {"WANDB_API_KEY": "canary-wandb-5f1e2d3c4b5a6978",
            "HF_TOKEN": "hf_canaryTOKEN0123456789abcdef",
            "HUGGING_FACE_HUB_TOKEN": "hf_canaryHUB9876543210fedcba"}
PROMPTS = 4


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isreg() else b"") for m in tar.getmembers()}


@pytest.fixture(scope="module")
def packaged(tiny_llama_dir, tmp_path_factory):
    """train output -> evaluate -> package --merge, all with credential canaries in the
    environment; the run_config holds a path under $HOME that must not leave."""
    root = tmp_path_factory.mktemp("chain")
    home_path = str(Path.home() / "private" / "data" / "sft_dataset.jsonl")
    adapter = make_adapter(tiny_llama_dir, root / "training_output" / "final_model",
                           lora_b_std=0.3, run_config_extra={"dataset": {
                               "path": home_path, "file_sha256": "cd" * 32,
                               "dataset_hash": "0123456789abcdef"}})
    out_dir = root / "packages"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in CANARIES.items():
            mp.setenv(name, value)
        assert llama_evaluate.main([
            "--adapter-path", str(adapter), "--dataset", str(GOLDEN), "--output",
            str(root / "training_output" / "evaluation_results.json"), "--num-samples", "3",
            "--max-new-tokens", "4", "--compare-base"]) == 0
        assert llama_package.main(["--adapter-path", str(adapter), "--output-dir", str(out_dir),
                                   "--merge"]) == 0
    archives = list(out_dir.glob("*.tar.gz"))
    assert len(archives) == 1
    name = archives[0].name[: -len(".tar.gz")]
    return SimpleNamespace(root=root, adapter=adapter, out_dir=out_dir, archive=archives[0],
                           name=name, base=tiny_llama_dir, home_path=home_path)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        llama_package.main(["--help"])
    assert e.value.code == 0
    assert "--verify" in capsys.readouterr().out


def test_output_files_and_archive_members_are_exact(packaged):
    sha8 = sha256_file(packaged.adapter / "adapter_model.safetensors")[:8]
    assert packaged.name == f"{packaged.base.name}-lora-{sha8}"
    n = packaged.name
    assert {p.name for p in packaged.out_dir.iterdir()} == {
        f"{n}.tar.gz", f"{n}.tar.gz.sha256", f"{n}.metadata.json", f"{n}.README.md",
        f"{n}.requirements.txt", f"{n}-merged"}
    assert set(_members(packaged.archive)) == {n} | {f"{n}/{f}" for f in (
        "adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "run_config.json",
        "evaluation_results.json", "README.md", "requirements.txt", "metadata.json",
        "SHA256SUMS")}
    with tarfile.open(packaged.archive, "r:gz") as tar:
        for m in tar.getmembers():
            assert (m.isdir() or m.isreg()) and m.uid == 0 and m.gid == 0


def test_sha256sums_cover_every_other_member(packaged):
    members = _members(packaged.archive)
    n = packaged.name
    sums = {}
    for line in members[f"{n}/SHA256SUMS"].decode().splitlines():
        digest, rel = line.split("  ", 1)
        sums[rel] = digest
    files = {k.split("/", 1)[1]: v for k, v in members.items() if "/" in k}
    assert set(sums) == set(files) - {"SHA256SUMS"}
    for rel, data in files.items():
        if rel != "SHA256SUMS":
            assert sums[rel] == _sha(data), rel
    # the packaged adapter is byte-identical to the trained one
    assert files["adapter_model.safetensors"] == (packaged.adapter / "adapter_model.safetensors").read_bytes()
    side = (packaged.out_dir / f"{n}.tar.gz.sha256").read_text().split()
    assert side == [_sha(packaged.archive.read_bytes()), f"{n}.tar.gz"]


def test_metadata_is_allow_listed(packaged):
    n = packaged.name
    meta = json.loads(_members(packaged.archive)[f"{n}/metadata.json"])
    assert meta == json.loads((packaged.out_dir / f"{n}.metadata.json").read_text())
    assert set(meta) == {"format_version", "name", "created", "base_model", "base_model_revision",
                         "model_size", "prompt_format", "max_length", "quantization",
                         "trust_remote_code", "lora", "training", "dataset", "evaluation",
                         "library_versions", "files", "merge", "reference_generation"}
    assert meta["base_model"] == str(packaged.base) and meta["model_size"] == "135m"
    assert meta["trust_remote_code"] is False and meta["quantization"] is None
    assert meta["lora"]["r"] == 8 and meta["lora"]["alpha"] == 16
    assert meta["training"]["learning_rate"] == 1e-3
    # the home path is reduced to its basename
    assert meta["dataset"] == {"name": "sft_dataset.jsonl", "file_sha256": "cd" * 32,
                               "dataset_hash": "0123456789abcdef"}
    assert meta["evaluation"]["metrics"]["overall"]["n"] == 3
    assert "deltas" in meta["evaluation"] and "base_metrics" in meta["evaluation"]
    assert meta["merge"]["dtype"] == "float32" and meta["merge"]["base_quantization"] is None
    assert meta["reference_generation"]["text"]  # recorded for --verify
    assert set(meta["library_versions"]["packaged_with"]) >= {"torch", "transformers", "peft"}
    members = _members(packaged.archive)
    for rel, digest in meta["files"].items():
        assert _sha(members[f"{n}/{rel}"]) == digest


def test_no_home_path_leaves_in_the_archive(packaged):
    home = str(Path.home())
    for name, data in _members(packaged.archive).items():
        assert packaged.home_path.encode() not in data, name
        assert (home + "/").encode() not in data, name
    run_cfg = json.loads(_members(packaged.archive)[f"{packaged.name}/run_config.json"])
    assert run_cfg["dataset"]["path"] == "sft_dataset.jsonl"
    assert run_cfg["base_model"] == str(packaged.base)  # not under $HOME: kept, verify needs it


def test_model_card_shows_usage_exact_prompt_and_evaluation(packaged, tokenizer):
    from llama_sft.data.prompts import render_prompt

    card = (packaged.out_dir / f"{packaged.name}.README.md").read_text()
    assert card == _members(packaged.archive)[f"{packaged.name}/README.md"].decode()
    for snippet in ("PeftModel.from_pretrained(model, adapter)", "merge_and_unload()",
                    "model.generate(", "add_special_tokens=False", "## Evaluation",
                    "**overall**", "adapter - base", "## Merged model", "sha256sum -c SHA256SUMS"):
        assert snippet in card, snippet
    rendered = render_prompt(tokenizer, "chat", *CARD_EXAMPLE)
    assert repr(rendered) in card
    # the card's build_prompt() renders exactly the training prompt
    code = re.search(r"(def build_prompt\(.*?)\n\n", card, flags=re.S).group(1)
    namespace = {"tokenizer": tokenizer}
    exec(code, namespace)  # noqa: S102 - our own generated card
    assert namespace["build_prompt"](*CARD_EXAMPLE) == rendered


@pytest.mark.parametrize("context", ["", "The battery lasts all day."])
def test_card_prompt_builder_matches_training_for_the_instruction_format(tokenizer, context):
    from llama_sft.data.prompts import render_prompt

    namespace = {"tokenizer": tokenizer}
    exec(_prompt_builder_code("instruction"), namespace)  # noqa: S102
    assert namespace["build_prompt"]("Label the review.", context) == render_prompt(
        tokenizer, "instruction", "Label the review.", context)


def test_requirements_pin_installed_versions(packaged):
    import importlib.metadata as md

    text = (packaged.out_dir / f"{packaged.name}.requirements.txt").read_text()
    pins = dict(line.split("==") for line in text.splitlines() if "==" in line)
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors"):
        assert pins[name] == md.version(name).split("+")[0]


def test_verify_passes_on_a_good_archive(packaged, capsys):
    assert llama_package.main(["--verify", str(packaged.archive)]) == 0
    out = capsys.readouterr().out
    assert "SHA256SUMS: 10 files OK" in out
    assert "List three primary colors" in out  # the fixed prompt is printed
    assert "matches the one recorded at packaging time" in out


def test_guarantee_11_packaged_adapter_is_the_trained_adapter(packaged, tmp_path):
    """RELIABILITY item 11: archive -> safe extract -> reload gives the same tensors and the
    same greedy text as the training output folder, and that text is the adapter's (it differs
    from the base model's, so a package that lost or zeroed the adapter would fail). The merged
    model and the QLoRA merge record: test_merged_model_matches_adapter_on_base and
    test_qlora_merge_records_the_unquantized_base."""
    import torch
    from safetensors.torch import load_file

    from llama_sft.data.loader import load_and_validate
    from llama_sft.data.prompts import render_prompt
    from llama_sft.evaluation.generate import generate
    from llama_sft.modeling.load import load_for_inference, load_model

    extracted = tmp_path / "x"
    result = run_verify(PackageArgs(verify=str(packaged.archive),
                                                                extract_to=str(extracted)))
    assert result["matches_reference"] is True
    folder = extracted / packaged.name
    examples, _ = load_and_validate(str(GOLDEN))
    texts = []
    for adapter in (packaged.adapter, folder):
        model, tok, _ = load_for_inference(adapter_path=str(adapter))
        prompts = [render_prompt(tok, "chat", ex.instruction, ex.context) for ex in examples[::40]]
        texts.append([g.text for g in generate(model, tok, prompts, max_new_tokens=12)])
    assert texts[0] == texts[1]
    assert any(texts[0])
    trained = load_file(str(packaged.adapter / "adapter_model.safetensors"))
    shipped = load_file(str(folder / "adapter_model.safetensors"))
    assert trained.keys() == shipped.keys()
    assert all(torch.equal(trained[k], shipped[k]) for k in trained)
    base = load_model(str(packaged.base), dtype=torch.float32).eval()
    assert [g.text for g in generate(base, tok, prompts, max_new_tokens=12)] != texts[0]


def test_guarantee_12_tampered_archive_is_rejected(packaged, tmp_path, capsys):
    """RELIABILITY item 12: SHA256SUMS inside the archive is checked on --verify, so one flipped
    bit in a member is rejected; the published archive sha256 beside it rejects the archive
    before it is opened. Unsafe members (absolute paths, '..', links, devices) are refused
    before extraction: test_unsafe_members_are_refused_before_extraction."""
    work = tmp_path / "unpacked"
    with tarfile.open(packaged.archive, "r:gz") as tar:
        tar.extractall(work, filter="data")
    weights = work / packaged.name / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the tensor data: still a loadable file
    weights.write_bytes(bytes(data))
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(tampered, "w:gz") as tar:
        tar.add(work / packaged.name, arcname=packaged.name)
    assert llama_package.main(["--verify", str(tampered)]) == 1
    err = capsys.readouterr().err
    assert "adapter_model.safetensors does not match SHA256SUMS" in err and "Traceback" not in err
    # beside the published sha256, the archive itself is rejected before it is opened
    shutil.copyfile(packaged.out_dir / f"{packaged.name}.tar.gz.sha256",
                    tmp_path / "tampered.tar.gz.sha256")
    assert llama_package.main(["--verify", str(tampered)]) == 1
    assert "the archive was modified" in capsys.readouterr().err


def _evil_archive(path: Path, evil: tarfile.TarInfo, payload: bytes = b"pwned\n") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("pkg/README.md")
        good.size = 3
        tar.addfile(good, io.BytesIO(b"hi\n"))
        if evil.isreg():
            evil.size = len(payload)
            tar.addfile(evil, io.BytesIO(payload))
        else:
            tar.addfile(evil)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink",
                                  "device"])
def test_unsafe_members_are_refused_before_extraction(kind, tmp_path, capsys):
    target = tmp_path / "evil.txt"
    if kind == "dotdot":
        info = tarfile.TarInfo("../evil.txt")
    elif kind == "nested-dotdot":
        info = tarfile.TarInfo("pkg/../../evil.txt")
    elif kind == "absolute":
        info = tarfile.TarInfo(str(target))
    elif kind in ("symlink", "hardlink"):
        info = tarfile.TarInfo("pkg/link")
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname = str(target)
    else:
        info = tarfile.TarInfo("pkg/dev")
        info.type = tarfile.CHRTYPE
    archive = _evil_archive(tmp_path / "evil.tar.gz", info)
    dest = tmp_path / "extract_here"
    rc = llama_package.main(["--verify", str(archive), "--extract-to", str(dest)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "refusing member" in err and "nothing was extracted" in err
    expected = {"dotdot": "'..'", "nested-dotdot": "'..'", "absolute": "absolute path",
                "symlink": "a link", "hardlink": "a link", "device": "device"}[kind]
    assert expected in err
    assert not target.exists()
    assert not dest.exists() or not any(dest.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz"]


def test_merged_model_matches_adapter_on_base(packaged):
    """The merged model loads without peft, generates the same greedy text as adapter-on-base,
    and its logits agree within 1e-4 absolute (float32; merging W + B @ A * scale reorders
    float sums, so bit-equality is not expected)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llama_sft.data.loader import load_and_validate
    from llama_sft.data.prompts import render_prompt
    from llama_sft.evaluation.generate import generate
    from llama_sft.modeling.load import load_model, load_tokenizer

    merged_dir = packaged.out_dir / f"{packaged.name}-merged"
    assert not (merged_dir / "adapter_config.json").exists()
    assert (merged_dir / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not hasattr(merged, "peft_config")
    on_base = PeftModel.from_pretrained(load_model(str(packaged.base), dtype=torch.float32),
                                        str(packaged.adapter)).eval()
    tok = load_tokenizer(str(merged_dir))
    examples, _ = load_and_validate(str(GOLDEN))
    prompts = [render_prompt(tok, "chat", ex.instruction, ex.context) for ex in examples[::40]]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        a = merged(**batch).logits
        b = on_base(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (a[mask] - b[mask]).abs().max().item() < 1e-4
    assert [g.text for g in generate(merged, tok, prompts, max_new_tokens=12)] == \
        [g.text for g in generate(on_base, tok, prompts, max_new_tokens=12)]


def test_no_canary_in_any_file_written(packaged):
    """Item 15 (the fast part; the whole pilot -> train -> evaluate -> package run is
    tests/test_e2e.py::test_guarantee_15_*): with credentials set to canary strings,
    evaluation and packaging wrote none of them into any file or archive member."""
    canaries = [v.encode() for v in CANARIES.values()]
    files = [p for p in packaged.root.rglob("*") if p.is_file()]
    assert len(files) > 15
    for path in files:
        data = path.read_bytes()
        for canary in canaries:
            assert canary not in data, path
    for name, data in _members(packaged.archive).items():
        for canary in canaries:
            assert canary not in data, name


def test_secret_in_run_config_stops_packaging(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The last line of defence: a credential's value in any file to be packaged (here a note
    in run_config.json) stops packaging, and the message names the variable, not the value."""
    monkeypatch.setenv("HF_TOKEN", CANARIES["HF_TOKEN"])
    adapter = make_adapter(tiny_llama_dir, tmp_path / "final_model", lora_b_std=0.3,
                           run_config_extra={"notes": f"token {CANARIES['HF_TOKEN']}"})
    out_dir = tmp_path / "packages"
    rc = llama_package.main(["--adapter-path", str(adapter), "--output-dir", str(out_dir),
                             "--no-record-generation"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "HF_TOKEN" in err and CANARIES["HF_TOKEN"] not in err
    assert list(out_dir.iterdir()) == []  # the staging folder is gone too


def test_guarantee_17_a_full_disk_while_writing_the_archive_leaves_no_partial_package(
        tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through the archive (the disk fills as it is written): exit 1, a message
    with the space it needs and what to change, and nothing left in --output-dir."""
    from llama_sft.packaging import archive

    adapter = make_adapter(tiny_llama_dir, tmp_path / "final_model", lora_b_std=0.3)
    out_dir = tmp_path / "packages"
    monkeypatch.setattr(archive, "open", full_disk_open, raising=False)
    rc = llama_package.main(["--adapter-path", str(adapter), "--output-dir", str(out_dir),
                             "--no-record-generation"])
    assert rc == 1
    err = _error(capsys)
    assert "error: not enough disk space to write the archive " in err
    assert "it needs about " in err and "is free on that filesystem" in err
    assert "The partial archive was removed" in err and "another --output-dir" in err
    assert list(out_dir.iterdir()) == []  # no archive, no partial one, no staging folder
    monkeypatch.undo()
    assert llama_package.main(["--adapter-path", str(adapter), "--output-dir", str(out_dir),
                               "--no-record-generation"]) == 0


def test_qlora_merge_records_the_unquantized_base(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "final_model", lora_b_std=0.3,
                           quantization="4bit")
    result = run_package(PackageArgs(
        adapter_path=str(adapter), output_dir=str(tmp_path / "packages"), merge=True,
        record_generation=False))
    meta = json.loads(Path(result["metadata"]).read_text())
    assert meta["quantization"] == "4bit"
    merge = meta["merge"]
    assert merge["trained_quantization"] == "4bit" and merge["base_quantization"] is None
    assert merge["base_model"] == str(tiny_llama_dir) and merge["dtype"] == "float32"
    assert "unquantized" in merge["note"]
    assert "quantization_config" not in json.loads((Path(result["merged"]) / "config.json").read_text())
    assert "QLoRA" in Path(result["readme"]).read_text()


def test_guide_flags_and_explicit_identity(packaged, tmp_path):
    rc = llama_package.main(["--adapter-path", str(packaged.adapter), "--base-model",
                             str(packaged.base), "--model-size", "135m", "--output-dir",
                             str(tmp_path), "--name", "guide", "--no-record-generation"])
    assert rc == 0
    assert (tmp_path / "guide.tar.gz").is_file()


def test_scrub_paths_replaces_home_paths_with_basenames():
    home = str(Path.home())
    data = {"a": f"{home}/models/llama", "b": [f"see {home}/x/data.jsonl now"], "c": 3,
            "d": "/tmp/kept", "e": "~/secret/cfg.json", "f": f"{home}fs/not-home"}
    assert scrub_paths(data) == {"a": "llama", "b": ["see data.jsonl now"], "c": 3,
                                               "d": "/tmp/kept", "e": "cfg.json",
                                               "f": f"{home}fs/not-home"}


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err


def test_bad_inputs_are_clean_errors(packaged, tmp_path, capsys):
    base_args = ["--output-dir", str(tmp_path), "--no-record-generation"]
    adapter = str(packaged.adapter)
    assert llama_package.main(["--adapter-path", adapter, "--base-model", "smollm2-135m"] + base_args) == 2
    assert "trained on" in _error(capsys)
    assert llama_package.main(["--adapter-path", adapter, "--model-size", "7b"] + base_args) == 2
    assert "--model-size" in _error(capsys)
    assert llama_package.main(["--adapter-path", str(tmp_path / "nope")] + base_args) == 2
    assert "no such folder" in _error(capsys)
    assert llama_package.main(base_args) == 2
    assert "--adapter-path is required" in _error(capsys)
    other = tmp_path / "other_eval.json"
    other.write_text(json.dumps({"model": {"adapter_sha256": "ef" * 32}}))
    assert llama_package.main(["--adapter-path", adapter, "--eval-results", str(other)] + base_args) == 2
    assert "evaluated another adapter" in _error(capsys)
    # re-running into an existing package is refused, never a silent overwrite
    assert llama_package.main(["--adapter-path", adapter, "--output-dir", str(packaged.out_dir),
                               "--no-record-generation"]) == 2
    assert "already exists" in _error(capsys)
    assert llama_package.main(["--verify", str(tmp_path / "missing.tar.gz")]) == 2
    assert "file not found" in _error(capsys)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not a tarball")
    assert llama_package.main(["--verify", str(garbage)]) == 1
    assert "not a readable .tar.gz" in _error(capsys)


@pytest.mark.slow
def test_embedded_model_evaluate_package_verify(embedded_model_dir, tmp_path, capsys):
    adapter = make_adapter(embedded_model_dir, tmp_path / "training_output" / "final_model",
                           lora_b_std=0.02, base_model="smollm2-135m")
    assert llama_evaluate.main(["--adapter-path", str(adapter), "--dataset", str(GOLDEN),
                                "--output", str(tmp_path / "training_output" / "evaluation_results.json"),
                                "--num-samples", "3", "--max-new-tokens", "8"]) == 0
    assert llama_package.main(["--adapter-path", str(adapter), "--base-model", "smollm2-135m",
                               "--model-size", "135m", "--output-dir", str(tmp_path / "packages")]) == 0
    archive = next((tmp_path / "packages").glob("*.tar.gz"))
    assert archive.name.startswith("smollm2-135m-lora-")
    card = next((tmp_path / "packages").glob("*.README.md")).read_text()
    assert "python3 llama_model.py" in card and "## Evaluation" in card
    capsys.readouterr()
    assert llama_package.main(["--verify", str(archive)]) == 0
    assert "matches the one recorded" in capsys.readouterr().out
