"""The one trainability policy: decided once, at construction, never in ``forward``."""

from __future__ import annotations

import fnmatch

from torch import nn

from interleaf.config import TrainableConfig


def trainable_parameter_names(model: nn.Module, cfg: TrainableConfig) -> list[str]:
    """Names of the parameters of a :class:`Flamingo` that train under ``cfg``.

    In ``resize`` mode the new tokens' rows live in the LM's embedding matrices, so those
    matrices train whole (as in OpenFlamingo); ``decoupled`` mode trains only the new rows.
    Default: the resampler, the cross-attention blocks and the new tokens' embedding rows
    train; the vision encoder and the language model stay frozen.
    """
    lm = model.language_model
    embedding_ids = {id(lm.lm.get_input_embeddings().weight), id(lm.lm.get_output_embeddings().weight)}
    names = []
    lm_names = [n for n, _ in lm.lm.named_parameters()]
    for pattern in cfg.lm_patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in lm_names):
            raise ValueError(
                f"trainable.lm_patterns: {pattern!r} matches no LM parameter (decoder layers that carry "
                "cross-attention are named like 'model.layers.0.decoder_layer.self_attn.q_proj.weight')"
            )
    for name, param in model.named_parameters(remove_duplicate=False):
        in_lm = name.startswith("language_model.lm.")
        lm_name = name.removeprefix("language_model.lm.")
        is_new_rows = name.startswith(("language_model.extra_embed.", "language_model.extra_head.")) or (
            not lm.decoupled and id(param) in embedding_ids
        )
        rules = (
            cfg.resampler and name.startswith("resampler."),
            cfg.cross_attention and ".xattn." in name,
            cfg.new_token_embeddings and is_new_rows,
            cfg.vision and name.startswith("vision."),
            cfg.lm and in_lm,
            in_lm and any(fnmatch.fnmatchcase(lm_name, pattern) for pattern in cfg.lm_patterns),
        )
        if any(rules):
            names.append(name)
    return names


def apply_trainable(model: nn.Module, cfg: TrainableConfig) -> list[str]:
    """Set ``requires_grad`` on every parameter from the policy; return the trainable names."""
    names = set(trainable_parameter_names(model, cfg))
    chosen = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in names}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    return [n for n, p in model.named_parameters() if p.requires_grad]
