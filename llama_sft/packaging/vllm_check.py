"""Whether a packaged adapter folder loads in vLLM as a LoRA adapter
(`vllm serve BASE --enable-lora --lora-modules NAME=FOLDER --max-lora-rank R`).

Each rule mirrors a check of vLLM's loader: `PEFTHelper._validate_features` and
`PEFTHelper.validate_legal` (vllm/lora/peft_helper.py), `LoRAModel.from_local_checkpoint`
(vllm/lora/lora_model.py: the weight names are what it trusts), `LoRAConfig.max_lora_rank`'s
choices (vllm/config/lora.py) and `LlamaForCausalLM.packed_modules_mapping`
(vllm/model_executor/models/llama.py). `check_vllm_adapter` returns every rule with its result;
packaging records them in metadata.json and `--verify` prints them. A failing rule is a warning,
never a packaging or verification failure: the adapter is still a valid peft adapter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

from llama_sft.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# `--max-lora-rank` accepts only these (vllm/config/lora.py MaxLoRARanks); the default is 16.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16

# The linear layers vLLM's Llama applies LoRA to: qkv_proj and gate_up_proj are packed from these.
LLAMA_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# init_lora_weights values that only set the initial adapter weights (vLLM accepts these);
# PiSSA, OLoRA, CorDA and LoftQ change the base weights and are refused.
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")

# PEFT options vLLM does not implement, each refused when set.
UNSUPPORTED_FEATURES = ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora")

_LORA_KEY = re.compile(r"^base_model\.model\.(?:.+\.)?([A-Za-z0-9_]+)\.lora_[AB]\.weight$")


class RuleResult(NamedTuple):
    """One vLLM rule: its name, whether the adapter satisfies it, and what was found."""

    rule: str
    passed: bool
    detail: str


def max_lora_rank_for(rank: int) -> int | None:
    """The smallest `--max-lora-rank` that serves an adapter of this rank (None: none does)."""
    return next((choice for choice in VLLM_MAX_LORA_RANKS if choice >= rank), None)


def _adapter_ranks(cfg: dict[str, Any]) -> list[Any]:
    pattern = cfg.get("rank_pattern") or {}
    return [cfg.get("r"), *(pattern.values() if isinstance(pattern, dict) else [])]


def _peft_type(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    return cfg.get("peft_type") == "LORA", f"peft_type is {cfg.get('peft_type')!r} (needs 'LORA')"


def _task_type(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    return (cfg.get("task_type") == "CAUSAL_LM",
            f"task_type is {cfg.get('task_type')!r} (needs 'CAUSAL_LM')")


def _weights(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    if not keys:
        return False, f"{ADAPTER_WEIGHTS} is missing or holds no tensor"
    return True, f"{ADAPTER_WEIGHTS} ({len(keys)} tensors)"


def _target_modules(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        names = sorted({t.rsplit(".", 1)[-1] for t in targets})
        return True, f"{len(targets)} modules listed ({', '.join(names)})"
    # peft resolves "all-linear" to the list when it saves; a string left here is a pattern
    # (a regex or "all-linear") that only peft knows how to expand.
    return False, f"target_modules is {targets!r}, not an explicit list of module names"


def _rank(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    ranks = _adapter_ranks(cfg)
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        return False, f"rank r={cfg.get('r')!r} (rank_pattern {cfg.get('rank_pattern')}) is not " \
                      "a positive integer"
    flag = max_lora_rank_for(max(ranks))
    if flag is None:
        return False, f"rank {max(ranks)} is above vLLM's largest --max-lora-rank " \
                      f"({VLLM_MAX_LORA_RANKS[-1]})"
    note = "" if flag <= VLLM_DEFAULT_MAX_LORA_RANK else \
        f"; above vLLM's default {VLLM_DEFAULT_MAX_LORA_RANK}, so the flag is needed"
    return True, f"r={max(ranks)}: serve with --max-lora-rank {flag}{note}"


def _modules_to_save(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    saved = cfg.get("modules_to_save")
    if saved:
        return False, f"modules_to_save is {saved!r}: vLLM loads LoRA matrices only (full " \
                      "copies of modules are refused)"
    return True, "no modules_to_save"


def _bias(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    bias, lora_bias = cfg.get("bias", "none"), cfg.get("lora_bias", False)
    bias_keys = [k for k in keys if k.endswith(".bias")]
    passed = bias == "none" and not lora_bias and not bias_keys
    return passed, (f"bias={bias!r}, lora_bias={bool(lora_bias)}, {len(bias_keys)} bias "
                    "tensors (vLLM supports none)")


def _dora(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    magnitude = [k for k in keys if "lora_magnitude_vector" in k]
    passed = not cfg.get("use_dora") and not magnitude
    return passed, f"use_dora={bool(cfg.get('use_dora'))} (vLLM does not load DoRA)"


def _peft_features(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    found = [name for name in UNSUPPORTED_FEATURES if cfg.get(name)]
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        found.append(f"init_lora_weights={init!r}")
    if found:
        return False, f"uses {', '.join(found)}, which vLLM does not implement"
    return True, "no aLoRA, layer replication, BD-LoRA, QALoRA or base-modifying init"


def _adapted_modules(cfg: dict[str, Any], keys: list[str]) -> tuple[bool, str]:
    found, odd = set(), []
    for key in keys:
        match = _LORA_KEY.match(key)
        if match and match.group(1) in LLAMA_LORA_MODULES:
            found.add(match.group(1))
        elif not key.endswith(".bias") and "lora_magnitude_vector" not in key:
            odd.append(key)
    if odd:
        return False, f"{len(odd)} tensors vLLM's Llama does not load as LoRA, e.g. {odd[0]!r} " \
                      f"(it adapts {', '.join(LLAMA_LORA_MODULES)})"
    return True, f"LoRA A/B on {', '.join(sorted(found)) or 'nothing'}"


RULES: tuple[tuple[str, Callable[[dict[str, Any], list[str]], tuple[bool, str]]], ...] = (
    ("peft_type", _peft_type),
    ("task_type", _task_type),
    ("safetensors_weights", _weights),
    ("target_modules", _target_modules),
    ("rank", _rank),
    ("modules_to_save", _modules_to_save),
    ("bias", _bias),
    ("dora", _dora),
    ("peft_features", _peft_features),
    ("adapted_modules", _adapted_modules),
)


def _weight_names(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return []
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return []


def check_vllm_adapter(folder: Path) -> list[RuleResult]:
    """Every rule of RULES on the adapter in `folder` (adapter_config.json and
    adapter_model.safetensors); an unreadable config fails every rule."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        reason = f"{ADAPTER_CONFIG} unreadable ({type(e).__name__})"
        return [RuleResult(rule, False, reason) for rule, _ in RULES]
    keys = _weight_names(folder / ADAPTER_WEIGHTS)
    return [RuleResult(rule, *check(cfg, keys)) for rule, check in RULES]


def vllm_summary(results: list[RuleResult], adapter_cfg: dict[str, Any]) -> dict[str, Any]:
    """What metadata.json records: the verdict, the --max-lora-rank to serve with, each rule."""
    ranks = [r for r in _adapter_ranks(adapter_cfg) if isinstance(r, int) and r > 0]
    return {"compatible": all(r.passed for r in results),
            "max_lora_rank": max_lora_rank_for(max(ranks)) if ranks else None,
            "rules": [r._asdict() for r in results]}


def format_vllm_results(results: list[RuleResult]) -> list[str]:
    """One line per rule, as `--verify` prints them."""
    return [f"vLLM {'ok  ' if r.passed else 'WARN'} {r.rule}: {r.detail}" for r in results]
