"""Read and write Hugging Face Llama folders (config.json + safetensors) without transformers.

Why no transformers here: conversion must work on a bare machine and must not build an
HF model (70B would not fit); a Llama folder is just a JSON config and tensor files.
Reading accepts ``model.safetensors``, sharded safetensors with an index, and legacy
``pytorch_model*.bin``.  Anything that is not a plain Llama (another architecture,
biases, RoPE scaling, a non-SiLU activation) is refused with a one-line error, because
megatron-sat's model would silently compute something else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from megatron_sat.model import LlamaShape
from megatron_sat.tools.cli import ToolError

CONFIG_FILE = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_hf_checkpoint(path: os.PathLike | str) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(folder: os.PathLike | str) -> dict:
    from megatron_sat.tools.file_checks import read_json

    if not Path(folder).is_dir():
        raise ToolError(f"HF model folder '{folder}' does not exist; pass a folder saved by "
                        f"save_pretrained (config.json + *.safetensors)")
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ToolError(f"no {CONFIG_FILE} in '{folder}'; pass an HF model folder "
                        f"(config.json + *.safetensors), e.g. one saved by save_pretrained")
    return read_json(path, "HF config", "re-save the model with save_pretrained")


def rope_theta(config: Mapping) -> float:
    """RoPE base from a transformers 4.x (``rope_theta``) or 5.x (``rope_parameters``) config."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def shape_from_hf_config(config: Mapping, make_vocab_size_divisible_by: int = 128) -> LlamaShape:
    """``LlamaShape`` of an HF Llama config; refuses what our model cannot reproduce."""
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise ToolError(f"checkpoint is a {config.get('model_type')!r} model "
                        f"({', '.join(archs) or 'no architectures'}), not Llama; only "
                        f"LlamaForCausalLM checkpoints (Llama-2 family) can be converted")
    required = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "vocab_size")
    bad = [k for k in required if not isinstance(config.get(k), int) or config[k] < 1]
    if bad:
        raise ToolError(f"config.json is not a complete Llama config (missing or bad "
                        f"{', '.join(bad)}); re-save the model with save_pretrained")
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (needs 'silu')")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (needs none)")
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default")
                                             != "default" else None)
    if scaling:
        problems.append(f"rope scaling {scaling!r} (needs none)")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim * heads != config["hidden_size"]:
        problems.append(f"head_dim={head_dim} × heads={heads} != hidden_size")
    if problems:
        raise ToolError("unsupported Llama variant: " + "; ".join(problems) +
                        "; megatron-sat models plain Llama-2 (SwiGLU, RoPE, no bias)")
    try:
        return LlamaShape(
            num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
            ffn_hidden_size=config["intermediate_size"], num_attention_heads=heads,
            num_query_groups=config.get("num_key_value_heads") or heads,
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            rotary_base=rope_theta(config), norm_epsilon=float(config.get("rms_norm_eps", 1e-5)),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    except (KeyError, ValueError, TypeError) as exc:
        raise ToolError(f"config.json is not a complete Llama config (missing or bad {exc}); "
                        f"re-save the model with save_pretrained") from None


def hf_config_from_shape(shape: LlamaShape, dtype: str, base: Optional[Mapping] = None) -> dict:
    """An HF ``config.json`` dict for ``shape`` that transformers 4.x and 5.x both read.

    ``base`` (the config the checkpoint was converted from) keeps fields we do not model,
    such as token ids; the shape fields always win.
    """
    config = dict(base or {})
    config.pop("rope_scaling", None)
    config.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden_size, "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size, "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.norm_epsilon, "rope_theta": shape.rotary_base,
        "rope_parameters": {"rope_theta": shape.rotary_base, "rope_type": "default"},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "dtype": dtype, "torch_dtype": dtype,
    })
    config.setdefault("bos_token_id", 1)
    config.setdefault("eos_token_id", 2)
    config.setdefault("initializer_range", 0.02)
    return config


def _weight_files(folder: Path) -> list:
    from megatron_sat.tools.file_checks import read_json

    for index in (SAFE_INDEX, BIN_INDEX):
        if (folder / index).is_file():
            fix = "re-save the model with save_pretrained"
            weight_map = read_json(folder / index, "HF weight index", fix).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ToolError(f"HF weight index '{folder / index}' has no 'weight_map'; {fix}")
            files = [folder / f for f in sorted(set(map(str, weight_map.values())))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ToolError(f"HF weight index '{folder / index}' names {len(missing)} missing "
                                f"shard(s) (first: {missing[0]}); copy every shard into the folder")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise ToolError(f"no weights in '{folder}' (model.safetensors, a safetensors index, or "
                    f"pytorch_model.bin); save the model with save_pretrained")


def check_hf_weights(folder: os.PathLike | str) -> None:
    """Every weight file of an HF folder is present and complete (reads headers only)."""
    from safetensors import safe_open

    from megatron_sat.tools.file_checks import load_torch_file, require

    fix = "the copy is truncated or corrupt; re-download or re-save it"
    for f in _weight_files(Path(folder)):
        require(f, "HF weight file", fix)
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as h:
                    h.keys()
            except Exception as exc:  # noqa: BLE001 - SafetensorError: one line
                first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
                raise ToolError(f"HF weight file '{f}' is unreadable ({first}); {fix}") from None
        else:
            load_torch_file(f, "HF weight file", fix)


def load_hf_state_dict(folder: os.PathLike | str) -> Dict[str, torch.Tensor]:
    """All tensors of an HF folder, on CPU, in their stored dtype."""
    from safetensors.torch import load_file

    from megatron_sat.tools.file_checks import load_torch_file, require

    fix = "the copy is truncated or corrupt; re-download or re-save it"
    state: Dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(folder)):
        if f.suffix == ".safetensors":
            require(f, "HF weight file", fix)
            try:
                state.update(load_file(str(f)))
            except Exception as exc:  # SafetensorError, OSError: one line, not a traceback
                first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
                raise ToolError(f"HF weight file '{f}' is unreadable ({first}); {fix}") from None
        else:
            loaded = load_torch_file(f, "HF weight file", fix, mmap=False)
            if not isinstance(loaded, dict):
                raise ToolError(f"HF weight file '{f}' holds no state dict; {fix}")
            state.update(loaded)
    return state


def load_hf_checkpoint(folder: os.PathLike | str, make_vocab_size_divisible_by: int = 128
                       ) -> Tuple[LlamaShape, dict, Dict[str, torch.Tensor]]:
    """``(shape, config, state_dict)`` of an HF Llama folder."""
    config = read_hf_config(folder)
    shape = shape_from_hf_config(config, make_vocab_size_divisible_by)
    return shape, config, load_hf_state_dict(folder)


def save_hf_checkpoint(folder: os.PathLike | str, state_dict: Mapping[str, torch.Tensor],
                       config: Mapping, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    shards, current, size = [], {}, 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """``--dtype`` value → torch dtype (``None``/``auto`` keeps the stored dtype)."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    if name in (None, "auto"):
        return None
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ToolError(f"--dtype {name!r} is not supported; choose auto, fp32, bf16 or fp16")
    return DTYPES[key]
