"""The one trainability policy: decided once, at construction, never in ``forward``.

Every parameter of a :class:`Flamingo` belongs to one group (:data:`GROUPS`); the policy
(:class:`TrainableConfig`) switches groups on, plus LM parameters chosen by glob. LoRA
adapters (:func:`apply_lora`) are injected into the LM's linear layers by ``peft`` before
the policy runs, and form the ``lora`` group.
"""

from __future__ import annotations

import fnmatch

from torch import nn
from transformers.pytorch_utils import Conv1D

from interleaf.config import LoraConfig, TrainableConfig
from interleaf.extras import optional_import
from interleaf.model.lm import CrossAttentionDecoderLayer, find_decoder_layers

GROUPS = ("resampler", "cross_attention", "new_token_embeddings", "lm", "lora", "vision", "image_generation")
LM_PREFIX = "language_model.lm."


def parameter_groups(model: nn.Module) -> dict[str, str]:
    """``{parameter name: group}`` for every parameter name of a :class:`Flamingo` (tied
    parameters under each of their names).

    In ``resize`` mode the new tokens' rows live in the LM's embedding matrices, so those
    matrices are the ``new_token_embeddings`` group; in ``decoupled`` mode the group is the
    separate new rows (``language_model.extra_embed`` / ``extra_head``).
    """
    lm = model.language_model
    embedding_ids = {id(lm.lm.get_input_embeddings().weight), id(lm.lm.get_output_embeddings().weight)}
    groups = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith("resampler."):
            group = "resampler"
        elif ".xattn." in name:
            group = "cross_attention"
        elif name.startswith(("language_model.extra_embed.", "language_model.extra_head.")) or (
            not lm.decoupled and id(param) in embedding_ids
        ):
            group = "new_token_embeddings"
        elif name.startswith("vision."):
            group = "vision"
        elif name.startswith("image_generator."):
            group = "image_generation"
        elif name.startswith(LM_PREFIX) and ".lora_" in name:
            group = "lora"
        elif name.startswith(LM_PREFIX):
            group = "lm"
        else:
            raise ValueError(f"parameter {name!r} belongs to no trainability group")
        groups[name] = group
    return groups


def trainable_parameter_names(model: nn.Module, cfg: TrainableConfig) -> list[str]:
    """Names of the parameters of a :class:`Flamingo` that train under ``cfg``.

    Default: the resampler, the cross-attention blocks and the new tokens' embedding rows
    train; the vision encoder and the language model stay frozen. ``lm_patterns`` add LM
    parameters by glob over their names below ``language_model.lm.``; with ``lora`` set, the
    adapters train.
    """
    lm_names = [n for n, _ in model.language_model.lm.named_parameters()]
    for pattern in cfg.lm_patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in lm_names):
            raise ValueError(
                f"trainable.lm_patterns: {pattern!r} matches no LM parameter (decoder layers that carry "
                "cross-attention are named like 'model.layers.0.decoder_layer.self_attn.q_proj.weight')"
            )
    enabled = {
        "resampler": cfg.resampler,
        "cross_attention": cfg.cross_attention,
        "new_token_embeddings": cfg.new_token_embeddings,
        "vision": cfg.vision,
        "lm": cfg.lm,
        "lora": cfg.lora is not None,
        "image_generation": cfg.image_generation,
    }
    names = []
    for name, group in parameter_groups(model).items():
        in_lm = name.startswith(LM_PREFIX)
        by_pattern = in_lm and any(fnmatch.fnmatchcase(name.removeprefix(LM_PREFIX), p) for p in cfg.lm_patterns)
        if enabled[group] or (cfg.lm and in_lm) or by_pattern:
            names.append(name)
    return names


def apply_trainable(model: nn.Module, cfg: TrainableConfig) -> list[str]:
    """Set ``requires_grad`` on every parameter from the policy; return the trainable names."""
    names = set(trainable_parameter_names(model, cfg))
    chosen = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in names}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts by group (:data:`GROUPS`), each tied parameter once, and
    their ``total``."""
    groups = parameter_groups(model)
    report = dict.fromkeys(GROUPS, 0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            report[groups[name]] += param.numel()
    report["total"] = sum(report[g] for g in GROUPS)
    return report


def format_parameter_report(model: nn.Module) -> str:
    """The trainable parameter counts as a small table: the total, then one line per group."""
    report, total = parameter_report(model), sum(p.numel() for p in model.parameters())
    lines = [f"trainable parameters: {report['total']:,} of {total:,} ({100 * report['total'] / max(total, 1):.2f}%)"]
    shown = [g for g in GROUPS if g != "image_generation" or getattr(model, "image_generator", None) is not None]
    lines += [f"  {group:<22}{report[group]:>16,}" for group in shown]
    return "\n".join(lines)


# -- LoRA ----------------------------------------------------------------------------------


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def lora_targets(language_model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Names (relative to ``language_model.lm``) of the linear layers that get adapters.

    ``cfg.target_modules`` globs select among the LM's linear layers outside the
    cross-attention blocks; by default, every linear layer of each decoder layer's
    self-attention submodule (the child whose name holds ``attn`` or ``attention``).
    """
    lm = language_model.lm
    linears = [n for n, m in lm.named_modules() if _is_linear(m) and ".xattn." not in f".{n}."]
    if cfg.target_modules:
        for pattern in cfg.target_modules:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
                raise ValueError(
                    f"trainable.lora.target_modules: {pattern!r} matches no linear layer of the LM (decoder layers "
                    "that carry cross-attention are named like 'model.layers.0.decoder_layer.self_attn.q_proj')"
                )
        return [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in cfg.target_modules)]
    path, layers = find_decoder_layers(lm, language_model.layers_path)
    targets = []
    for i, layer in enumerate(layers):
        prefix = f"{path}.{i}"
        if isinstance(layer, CrossAttentionDecoderLayer):
            layer, prefix = layer.decoder_layer, f"{prefix}.decoder_layer"
        for child_name, child in layer.named_children():
            if "attn" in child_name.lower() or "attention" in child_name.lower():
                targets += [f"{prefix}.{child_name}.{n}" for n, m in child.named_modules() if _is_linear(m)]
    if not targets:
        raise ValueError(
            f"trainable.lora: found no self-attention linear layers in the decoder layers of {type(lm).__name__}; "
            "name them with trainable.lora.target_modules"
        )
    return targets


def apply_lora(language_model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject LoRA adapters (``peft``, adapter ``default``, bias untouched) into the LM's
    target linear layers in place; the wrapper layers around them stay as they are. Returns
    the targeted module names."""
    peft = optional_import("peft", "trainable.lora (LoRA adapters)", "train")
    targets = lora_targets(language_model, cfg)
    modules = dict(language_model.lm.named_modules())
    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=all(isinstance(modules[t], Conv1D) for t in targets),
    )
    peft.inject_adapter_in_model(config, language_model.lm)
    return targets
