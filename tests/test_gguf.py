"""GGUF export (`llama_package.py --gguf TYPE`): the file holds what llama.cpp and transformers
need to reproduce the merged model, its tokenizer and where it stops.

- tiny random models (fast): every tokenizer kind tokenizes a fixed multilingual chat with
  special tokens to the same ids in llama.cpp as in transformers; the stop keys; llama.cpp's
  logits equal transformers' (tied and untied output, grouped KV heads, Llama 3.1 rope scaling);
  refusals; the --gguf flag through the package stage.
- the embedded SmolLM2-135M with a LoRA adapter (slow): transformers reads the exported files back
  (f16/bf16 bit-exact, greedy generations equal the merged model's, q8_0 >= 95% of teacher-forced
  argmaxes); llama.cpp's greedy text equals the merged model's for 16 tokens (f16, bf16) and its
  chat completion ends at the turn end.

The llama.cpp tests need llama-cpp-python and the SentencePiece test sentencepiece, both in
requirements_gguf_test.txt, which `make setup` installs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
from helpers import GOLDEN, make_adapter
from template_tokenizers import (
    chatml_tokenizer,
    llama2_tokenizer,
    llama3_tokenizer,
    training_corpus,
)

import llama_package
from llama_sft.errors import PackageError
from llama_sft.packaging.gguf import end_of_turn_id, write_gguf
from llama_sft.packaging.gguf_vocab import UNUSED, vocab_for

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed: pip install -r requirements_gguf_test.txt "
           "(make setup does)")
needs_sentencepiece = pytest.mark.skipif(
    importlib.util.find_spec("sentencepiece") is None,
    reason="sentencepiece is not installed: pip install -r requirements_gguf_test.txt")

MULTILINGUAL = ("Grüße aus München! Кошка спит на диване. 猫はソファで寝ています。 مرحبا بالعالم "
                "नमस्ते 🦙 naïve café, 12,345.67 ¿Dónde?\n\n\tindented  two spaces")
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers.", "Explain what a tokenizer does in one sentence.")
GREEDY_TOKENS = 16


@contextlib.contextmanager
def llama(path: Path, **kwargs):
    """A llama_cpp.Llama closed on exit (its __del__ at interpreter exit is noisy)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), verbose=False, n_threads=2, **kwargs)
    try:
        yield llm
    finally:
        llm.close()


def chat_text(tok) -> str:
    """A conversation with a system turn, rendered by the tokenizer's own template: special
    tokens between multilingual text."""
    return tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MULTILINGUAL},
         {"role": "assistant", "content": "Sure: " + MULTILINGUAL}], tokenize=False)


def tiny_model(tok, **overrides):
    """A 2-layer random LLaMA for `tok` (4 heads, 2 KV heads) with weights exactly representable
    in f16, so an f16 export changes nothing but the arithmetic."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                    max_position_embeddings=1024, tie_word_embeddings=True,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    settings.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def export_tiny(tok, dest: Path, **overrides) -> Path:
    model = tiny_model(tok, **overrides)
    vocab = vocab_for(tok, model.config.vocab_size, eot_id=end_of_turn_id(tok, "chat"))
    write_gguf(model, vocab, dest, gguf_type="f16", name="tiny")
    return dest


def sentencepiece_tokenizer(folder: Path, *, legacy: bool | None):
    """A Llama 2-style tokenizer trained here with the sentencepiece package (BPE, byte fallback,
    <unk> <s> </s> at 0-2), wrapped as transformers' LlamaTokenizer with Llama 2 chat's template.
    legacy=True prefixes "▁" after every special token (as Llama 2's own tokenizer.json does),
    the default (legacy=False) only at the very start of the text."""
    import sentencepiece as spm
    from template_tokenizers import LLAMA2_TEMPLATE
    from transformers import LlamaTokenizer

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus()), model_writer=proto, model_type="bpe",
        vocab_size=800, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(folder), **({} if legacy is None else
                                                          {"legacy": legacy}))
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


TOKENIZERS = {
    "smollm2-bpe": chatml_tokenizer,
    "llama3-bpe": llama3_tokenizer,
    "llama3-bpe-eos-end_of_text": lambda: llama3_tokenizer(eos="<|end_of_text|>"),
    "llama2-bpe-metaspace": llama2_tokenizer,
}
# Metaspace with prepend_scheme "first": "▁" only before text at offset 0, which llama.cpp
# cannot express; the export matches it for text that starts with a special token (every
# prompt the toolkit renders starts with <s>), not for plain text.
PREFIX_FIRST = {"llama2-bpe-metaspace"}


def texts_for(tok, plain: bool) -> list[str]:
    specials = "".join(tok.all_special_tokens)
    texts = [chat_text(tok), specials + MULTILINGUAL + specials + MULTILINGUAL]
    return texts + ([MULTILINGUAL] if plain else [])


# ------------------------------------------------------------------------------ tiny, fast
@needs_llama_cpp
@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_llama_cpp_tokenizes_like_transformers(kind, tmp_path):
    tok = TOKENIZERS[kind]()
    gguf = export_tiny(tok, tmp_path / "tiny.gguf")
    with llama(gguf, vocab_only=True) as llm:
        for text in texts_for(tok, plain=kind not in PREFIX_FIRST):
            expected = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
        with_bos = llm.tokenize(b"Hi there", add_bos=True)
        assert (with_bos[0] == tok.bos_token_id) == (tok("Hi")["input_ids"][0] == tok.bos_token_id)


@needs_llama_cpp
@needs_sentencepiece
@pytest.mark.parametrize("legacy", [True, None])
def test_sentencepiece_tokenizer_survives(legacy, tmp_path):
    """llama.cpp's SentencePiece tokenizer ("llama" model, scores, byte pieces) on a tokenizer
    trained by sentencepiece: the same ids for a chat (which starts with <s>, as every prompt the
    toolkit renders does), for text around special tokens, and for characters outside the
    vocabulary (byte fallback)."""
    tok = sentencepiece_tokenizer(tmp_path / "sp", legacy=legacy)
    gguf = export_tiny(tok, tmp_path / "sp.gguf")
    texts = texts_for(tok, plain=bool(legacy)) + ["<s>[INST] 🦙 Ωμέγα [/INST] ok </s><s>[INST]"]
    with llama(gguf, vocab_only=True) as llm:
        for text in texts:
            expected = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
        assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(expected))


@needs_llama_cpp
def test_llama3_stops_at_eot_when_eos_is_end_of_text(tmp_path):
    """A Llama 3 tokenizer whose EOS is <|end_of_text|> while its template ends turns with
    <|eot_id|>: the file keeps EOS and names <|eot_id|> as tokenizer.ggml.eot_token_id, and
    llama.cpp ends generation at both."""
    import llama_cpp

    tok = llama3_tokenizer(eos="<|end_of_text|>")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    gguf = export_tiny(tok, tmp_path / "l3.gguf")
    with llama(gguf, vocab_only=True) as llm:
        vocab = llm._model.vocab
        assert llama_cpp.llama_vocab_eos(vocab) == tok.eos_token_id != eot
        assert llama_cpp.llama_vocab_eot(vocab) == eot
        assert llama_cpp.llama_vocab_is_eog(vocab, eot)
        assert llama_cpp.llama_vocab_get_add_bos(vocab)
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        assert llm.metadata["tokenizer.ggml.pre"] == "llama-bpe"


def _logits(model, gguf: Path, ids: list[int]):
    import numpy as np
    import torch

    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    with llama(gguf, n_ctx=512, logits_all=True) as llm:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    return got, expected


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}


@needs_llama_cpp
@pytest.mark.parametrize("shape", ["tied", "untied", "llama3.1-rope"])
def test_llama_cpp_logits_equal_transformers(shape, tmp_path):
    """Q/K rows permuted for llama.cpp's rotation (4 heads, 2 KV heads), output.weight written
    only when untied, and Llama 3.1's rope scaling as rope_freqs.weight: over 300 positions
    llama.cpp's logits stay within 1e-3 of transformers' (measured 2.4e-4 to 2.7e-4; ignoring the
    rope scaling costs 4.6e-3)."""
    import numpy as np

    tok = llama3_tokenizer()
    overrides = {"tied": {}, "untied": {"tie_word_embeddings": False},
                 "llama3.1-rope": {"rope_parameters": LLAMA31_ROPE}}[shape]
    model = tiny_model(tok, **overrides)
    gguf = export_tiny(tok, tmp_path / "t.gguf", **overrides)
    ids = np.random.RandomState(0).randint(5, 900, size=300).tolist()
    got, expected = _logits(model, gguf, ids)
    assert np.abs(got - expected).max() < 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    if shape == "llama3.1-rope":
        plain = tiny_model(tok, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
        _, unscaled = _logits(plain, gguf, ids)
        assert np.abs(got - unscaled).max() > 5 * np.abs(got - expected).max()


@needs_llama_cpp
def test_embedding_rows_past_the_tokenizer_are_unused_tokens(tmp_path):
    tok = chatml_tokenizer()
    model = tiny_model(tok, vocab_size=len(tok) + 7)
    vocab = vocab_for(tok, model.config.vocab_size, eot_id=None)
    assert vocab.padded_rows == 7 and vocab.token_types[-7:] == [UNUSED] * 7
    write_gguf(model, vocab, tmp_path / "p.gguf", gguf_type="q8_0", name="p")
    with llama(tmp_path / "p.gguf", vocab_only=True) as llm:
        assert llm.n_vocab() == len(tok) + 7


def test_unsupported_models_and_tokenizers_are_refused(tmp_path):
    from tokenizers import Regex, pre_tokenizers

    tok = chatml_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{L}+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(PackageError, match="pre-tokenizer"):
        vocab_for(tok, len(tok), eot_id=None)
    good = chatml_tokenizer()
    with pytest.raises(PackageError, match="ids up to"):
        vocab_for(good, len(good) - 1, eot_id=None)
    vocab = vocab_for(good, len(good), eot_id=None)
    for overrides, reason in (({"attention_bias": True}, "biases"),
                              ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                    "rope_theta": 1e4}}, "rope type")):
        with pytest.raises(PackageError, match=reason):
            write_gguf(tiny_model(good, **overrides), vocab, tmp_path / "x.gguf",
                       gguf_type="f16", name="x")


def test_gguf_flag_help_and_bad_type(capsys):
    help_text = llama_package.build_parser().format_help()
    assert "--gguf {f16,bf16,q8_0,q4_0}" in help_text
    with pytest.raises(SystemExit) as e:
        llama_package.build_parser().parse_args(["--gguf", "q5_k"])
    assert e.value.code == 2 and "invalid choice: 'q5_k'" in capsys.readouterr().err


def _archive_member(archive: Path, suffix: str) -> tuple[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
        return member.name, tar.extractfile(member).read()


def test_package_gguf_records_the_qlora_merge(tiny_llama_dir, tmp_path):
    """--gguf through the package stage on a QLoRA adapter: the file is an archive member with
    its sha256 in SHA256SUMS and metadata.json, which records the merge into the unquantized
    base as --merge does."""
    import hashlib

    adapter = make_adapter(tiny_llama_dir, tmp_path / "final_model", lora_b_std=0.3,
                           quantization="4bit")
    out = tmp_path / "packages"
    assert llama_package.main(["--adapter-path", str(adapter), "--output-dir", str(out),
                               "--gguf", "q8_0", "--no-record-generation"]) == 0
    meta = json.loads(next(out.glob("*.metadata.json")).read_text())
    gguf = meta["gguf"]
    name, data = _archive_member(next(out.glob("*.tar.gz")), "-q8_0.gguf")
    assert name.endswith(f"{meta['name']}-q8_0.gguf") and gguf["file"] == Path(name).name
    assert hashlib.sha256(data).hexdigest() == gguf["sha256"] == meta["files"][gguf["file"]]
    assert gguf["size_bytes"] == len(data) and gguf["type"] == "q8_0"
    assert gguf["trained_quantization"] == "4bit" and gguf["base_quantization"] is None
    assert "unquantized" in gguf["note"] and gguf["merge_dtype"] == "float32"
    assert gguf["tokenizer"]["special_token_ids"]["eot"] == 2  # <|im_end|>
    _, sums = _archive_member(next(out.glob("*.tar.gz")), "SHA256SUMS")
    assert f"{gguf['sha256']}  {gguf['file']}" in sums.decode()


# --------------------------------------------------------------- the embedded model (slow)
@pytest.fixture(scope="module")
def exported(embedded_model_dir, tmp_path_factory):
    """An adapter on the embedded model, its merge (fp32), the base, and the exported files:
    q8_0 through `llama_package.py --gguf q8_0` (taken out of the archive), the other types
    written from the same merged model."""
    import time

    import torch
    from transformers import AutoTokenizer

    from llama_sft.modeling.load import load_model
    from llama_sft.packaging.gguf import load_merged

    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)  # make_adapter seeds the B matrices only; peft draws A before that
    adapter = make_adapter(embedded_model_dir, root / "final_model", lora_b_std=0.02,
                           base_model="smollm2-135m")
    out = root / "packages"
    t0 = time.time()
    assert llama_package.main(["--adapter-path", str(adapter), "--output-dir", str(out),
                               "--gguf", "q8_0", "--no-record-generation"]) == 0
    package_seconds = time.time() - t0
    meta = json.loads(next(out.glob("*.metadata.json")).read_text())
    files = {"q8_0": root / "m-q8_0.gguf"}
    files["q8_0"].write_bytes(_archive_member(next(out.glob("*.tar.gz")), "-q8_0.gguf")[1])
    tok = AutoTokenizer.from_pretrained(str(adapter))
    merged, _ = load_merged(adapter, "smollm2-135m", dtype=torch.float32, trust_remote_code=False)
    vocab = vocab_for(tok, merged.config.vocab_size, eot_id=end_of_turn_id(tok, "chat"))
    for kind in ("f16", "bf16", "q4_0"):
        files[kind] = root / f"m-{kind}.gguf"
        write_gguf(merged, vocab, files[kind], gguf_type=kind, name="m")
    base = load_model("smollm2-135m", dtype=torch.float32).eval()
    return dict(root=root, files=files, tok=tok, merged=merged, base=base, meta=meta,
                package_seconds=package_seconds, references={})


def reference(exported, kind: str):
    """What an export of `kind` is compared with: the merged fp32 model for f16; for bf16 the
    merged model at bf16 precision (its weights rounded to bf16, as --merge --merge-dtype
    bfloat16 saves them), computed in fp32. bf16 keeps 8 bits of mantissa, enough to flip a
    near-tie against the fp32 model within 16 tokens."""
    import copy

    import torch

    if kind == "f16":
        return exported["merged"]
    if kind not in exported["references"]:
        model = copy.deepcopy(exported["merged"])
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        exported["references"][kind] = model
    return exported["references"][kind]


def _prompt_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _greedy(model, tok, n: int = GREEDY_TOKENS) -> list[list[int]]:
    import torch

    out = []
    for prompt in PROMPTS:
        ids = _prompt_ids(tok, prompt)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        out.append(gen[0, len(ids):].tolist())
    return out


def _teacher_forced(tok) -> list[list[int]]:
    """The first 8 golden-set examples as trained (chat template, prompt + response)."""
    from llama_sft.data.prompts import user_message

    rows = [json.loads(line) for line in GOLDEN.read_text().splitlines()[:8]]
    return [tok(tok.apply_chat_template(
        [{"role": "user", "content": user_message(r["instruction"], r.get("context") or "")},
         {"role": "assistant", "content": r["response"]}], tokenize=False),
        add_special_tokens=False)["input_ids"] for r in rows]


def _argmax_agreement(model, sequences, reference_model) -> float:
    import torch

    same = total = 0
    with torch.no_grad():
        for ids in sequences:
            a = model(torch.tensor([ids])).logits[0].argmax(-1)
            b = reference_model(torch.tensor([ids])).logits[0].argmax(-1)
            same, total = same + int((a == b).sum()), total + len(ids)
    return same / total


@pytest.mark.slow
def test_embedded_package_metadata_and_hyperparameters(exported):
    from gguf import GGUFReader

    gguf, cfg = exported["meta"]["gguf"], exported["merged"].config
    assert gguf["tokenizer"]["model"] == "gpt2" and gguf["tokenizer"]["pre"] == "gpt-2"
    assert gguf["tensor_types"] == {"Q8_0": 211, "F32": 61}
    reader = GGUFReader(exported["files"]["q8_0"])

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    expected = {"context_length": 8192, "embedding_length": 576, "block_count": 30,
                "feed_forward_length": 1536, "attention.head_count": 9,
                "attention.head_count_kv": 3, "rope.dimension_count": 64, "vocab_size": 49152}
    assert {k: field(f"llama.{k}") for k in expected} == expected
    assert field("llama.rope.freq_base") == cfg.rope_parameters["rope_theta"]
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field("general.file_type") == 7  # MOSTLY_Q8_0
    assert field("tokenizer.chat_template") == exported["tok"].chat_template
    assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.eot_token_id") == 2
    assert field("tokenizer.ggml.add_bos_token") is False
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied to token_embd


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_transformers_reads_f16_and_bf16_back_exactly(exported, kind):
    """Every tensor equals the merged model's cast to the type, bit for bit, and greedy
    generations equal the merged model's (`reference`) on the fixed prompts, which the base
    model's do not: the adapter is in the file."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = exported["files"][kind]
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[kind]
    state = loaded.state_dict()
    for key, value in exported["merged"].state_dict().items():
        assert torch.equal(state[key], value.to(dtype).float()), key
    tok = exported["tok"]
    expected = _greedy(reference(exported, kind), tok)
    assert _greedy(loaded, tok) == expected
    assert _greedy(exported["base"], tok) != expected


@pytest.mark.slow
@pytest.mark.parametrize("kind,share", [("q8_0", 0.95), ("q4_0", 0.6)])
def test_transformers_reads_quantized_exports(exported, kind, share):
    """Teacher-forced next-token argmaxes over the first 8 golden-set chats (920 tokens) agree
    with the merged fp32 model's: q8_0 >= 95% (measured 98.8%); q4_0, a smoke level for a 135M
    model whose base was itself 4-bit (Q4_1) and sits off q4_0's grid, >= 60% (measured 63.8%;
    the adapter alone moves 4.8%)."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = exported["files"][kind]
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
    sequences = _teacher_forced(exported["tok"])
    assert _argmax_agreement(loaded, sequences, exported["merged"]) >= share


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_tokenizes_like_the_embedded_tokenizer(exported):
    tok = exported["tok"]
    with llama(exported["files"]["f16"], vocab_only=True) as llm:
        for text in (chat_text(tok), MULTILINGUAL + "<|im_start|><|im_end|><|endoftext|>"):
            expected = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_llama_cpp_greedy_text_equals_the_merged_model(exported, kind):
    """llama.cpp (llama-cpp-python) on the export: its greedy continuation of each fixed chat
    prompt equals the merged model's (`reference`) for the first 16 tokens or up to the turn
    end (measured: all 4 prompts, for f16 and bf16, with adapters of seeds 0-3)."""
    tok = exported["tok"]
    expected = _greedy(reference(exported, kind), tok)
    with llama(exported["files"][kind], n_ctx=512) as llm:
        for prompt, want in zip(PROMPTS, expected):
            got = []
            for token in llm.generate(_prompt_ids(tok, prompt), temp=0.0, top_k=1, reset=True):
                got.append(token)
                if len(got) == len(want) or token == tok.eos_token_id:
                    break
            assert got == want, (prompt, tok.decode(got), tok.decode(want))


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_chat_completion_stops_at_the_turn_end(exported):
    """create_chat_completion with the template from the file: the prompt is the same tokens
    transformers renders, the reply equals the merged model's greedy reply (up to 48 tokens), and
    where that reply ends with <|im_end|> llama.cpp stops there too: finish_reason "stop", no
    <|im_end|> in the text."""
    import torch

    tok, merged = exported["tok"], exported["merged"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stopped = 0
    with llama(exported["files"]["f16"], n_ctx=512) as llm:
        for prompt in PROMPTS:
            ids = _prompt_ids(tok, prompt)
            with torch.no_grad():
                gen = merged.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                      pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            reply = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                               temperature=0.0, top_k=1, max_tokens=48)
            choice = reply["choices"][0]
            assert reply["usage"]["prompt_tokens"] == len(ids)
            assert choice["message"]["content"] == tok.decode(gen, skip_special_tokens=True)
            assert "<|im_end|>" not in choice["message"]["content"]
            ends_turn = gen[-1] == im_end
            assert choice["finish_reason"] == ("stop" if ends_turn else "length")
            stopped += ends_turn
    assert stopped >= 2
