"""A tiny LoRA adapter (PEFT format) for the embedded model, written by the test itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 8


def write_adapter(model_dir: Path, target: Path, b_scale: float, seed: int = 0) -> Path:
    """Rank-8 LoRA on q_proj and v_proj of every layer. ``b_scale`` 0 gives B = 0: the adapter
    changes nothing; otherwise B is random (normal, times ``b_scale``)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    outputs = {"q_proj": config["num_attention_heads"] * head_dim, "v_proj": config["num_key_value_heads"] * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, out in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=generator) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=generator) * b_scale
    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, target / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0,
        "target_modules": list(outputs),
        "bias": "none",
        "base_model_name_or_path": str(model_dir),
    }
    (target / "adapter_config.json").write_text(json.dumps(adapter_config))
    return target
