"""IDEFICS (``IdeficsForVisionText2Text``, e.g. HuggingFaceM4/idefics-9b) -> interleaf.

IDEFICS is a Flamingo whose language model is LLaMA with decoupled embeddings for its two
new tokens, whose vision tower is IDEFICS' CLIP-style transformer (features: the encoder's
last hidden state, class token included, no final LayerNorm), whose Perceiver uses ReLU and
optional q/k LayerNorm, and whose gated cross-attention uses RMSNorm, a SwiGLU feed-forward,
optional RMSNorm on q/k, and sits before decoder layers ``i % cross_layer_interval == 0``.
Its processor writes images as ``<fake_token_around_image><image><fake_token_around_image>``
and lets an EOS end the reach of earlier images. All of that is interleaf configuration;
this module only renames weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import transformers

from interleaf.config import (
    CrossAttentionConfig,
    FlamingoConfig,
    LMConfig,
    ResamplerConfig,
    TokensConfig,
    VisionConfig,
)
from interleaf.convert.common import meta_model, read_state_dict, write_checkpoint
from interleaf.model.vision import tower_from_config

FAKE = "<fake_token_around_image>"
IMAGE = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"


def flamingo_config(cfg: transformers.IdeficsConfig, tokenizer) -> FlamingoConfig:
    if cfg.tie_word_embeddings:
        raise ValueError("IDEFICS with tie_word_embeddings=True is not supported (no released model uses it)")
    perceiver = cfg.perceiver_config
    vision = cfg.vision_config
    instruct = END_OF_UTTERANCE in tokenizer.get_vocab()
    return FlamingoConfig(
        vision=VisionConfig(layer=-1, post_layernorm=False, drop_cls=False),
        lm=LMConfig(new_token_embeddings="decoupled", added_tokens=_added_tokens(cfg, tokenizer)),
        resampler=ResamplerConfig(
            enabled=cfg.use_resampler,
            depth=perceiver.resampler_depth,
            num_latents=perceiver.resampler_n_latents,
            heads=perceiver.resampler_n_heads,
            head_dim=perceiver.resampler_head_dim,
            ff_dim=vision.embed_dim * 4,
            activation="relu",
            qk_norm=perceiver.qk_layer_norms_perceiver,
        ),
        cross_attention=CrossAttentionConfig(
            interval=cfg.cross_layer_interval,
            offset=0,
            heads=cfg.num_attention_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            ff_dim=cfg.intermediate_size,
            activation=_activation(cfg.hidden_act),
            gated_ff=True,
            norm="rmsnorm",
            norm_eps=cfg.rms_norm_eps,
            qk_norm="rmsnorm" if cfg.qk_layer_norms else None,
            gate="vector" if cfg.alpha_type == "vector" else "scalar",
            media_attention="last",
            reset_at_eos=True,
        ),
        tokens=TokensConfig(
            image=IMAGE,
            end_of_chunk=None,
            image_prompt=f"{FAKE}{IMAGE}{FAKE}",
            extra=(FAKE,),
            strip_text=True,
            text_separator=END_OF_UTTERANCE if instruct else "",
        ),
    )


def _activation(name: str) -> str:
    known = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu", "gelu_pytorch_tanh": "gelu_tanh"}
    if name not in known:
        raise ValueError(f"IDEFICS hidden_act={name!r} is not supported; known: {sorted(known)}")
    return known[name]


def _added_tokens(cfg, tokenizer) -> tuple[str, ...]:
    """The tokens IDEFICS embeds in its additional (decoupled) rows, in id order."""
    vocab = tokenizer.get_vocab()
    rows = sorted((i, t) for t, i in vocab.items() if i >= cfg.vocab_size)
    if len(rows) != cfg.additional_vocab_size:
        raise ValueError(
            f"the tokenizer has {len(rows)} tokens at ids >= vocab_size={cfg.vocab_size}, but the model has "
            f"additional_vocab_size={cfg.additional_vocab_size} decoupled rows"
        )
    for token in (FAKE, IMAGE):
        if token not in vocab:
            raise ValueError(f"the IDEFICS tokenizer has no {token!r} token")
    return tuple(t for _, t in rows)


def lm_config(cfg: transformers.IdeficsConfig) -> transformers.LlamaConfig:
    """The LLaMA that IDEFICS' decoder is (same layers, RoPE, norms and MLP)."""
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )


# (IDEFICS name pattern, interleaf name template); {x} is the cross-attention block's decoder layer.
_RULES = [
    (r"model\.embed_tokens\.weight", "language_model.lm.model.embed_tokens.weight"),
    (r"model\.embed_tokens\.additional_embedding\.weight", "language_model.extra_embed.weight"),
    (r"lm_head\.weight", "language_model.lm.lm_head.weight"),
    (r"lm_head\.additional_fc\.weight", "language_model.extra_head.weight"),
    (r"model\.norm\.weight", "language_model.lm.model.norm.weight"),
    (r"model\.layers\.(\d+)\.(.+)", "language_model.lm.model.layers.{layer}.{rest}"),
    (r"model\.vision_model\.(.+)", "vision.tower.{0}"),
    (r"model\.perceiver_resampler\.latents", "resampler.latents"),
    (r"model\.perceiver_resampler\.layer_norm\.(\w+)", "resampler.norm.{0}"),
    (r"model\.perceiver_resampler\.blocks\.(\d+)\.0\.context_layer_norm\.(\w+)", "resampler.layers.{0}.norm_media.{1}"),
    (
        r"model\.perceiver_resampler\.blocks\.(\d+)\.0\.latents_layer_norm\.(\w+)",
        "resampler.layers.{0}.norm_latents.{1}",
    ),
    (
        r"model\.perceiver_resampler\.blocks\.(\d+)\.0\.([qkv])_proj\.weight",
        "resampler.layers.{0}.attn.{1}_proj.weight",
    ),
    (r"model\.perceiver_resampler\.blocks\.(\d+)\.0\.output_proj\.weight", "resampler.layers.{0}.attn.o_proj.weight"),
    (
        r"model\.perceiver_resampler\.blocks\.(\d+)\.0\.([qk])_layer_norm\.(\w+)",
        "resampler.layers.{0}.attn.{1}_norm.{2}",
    ),
    (r"model\.perceiver_resampler\.blocks\.(\d+)\.1\.ln\.(\w+)", "resampler.layers.{0}.ff.norm.{1}"),
    (r"model\.perceiver_resampler\.blocks\.(\d+)\.1\.fc\.weight", "resampler.layers.{0}.ff.up_proj.weight"),
    (r"model\.perceiver_resampler\.blocks\.(\d+)\.1\.c_proj\.weight", "resampler.layers.{0}.ff.down_proj.weight"),
    (r"model\.gated_cross_attn_layers\.(\d+)\.input_layernorm\.weight", "{x}.norm.weight"),
    (r"model\.gated_cross_attn_layers\.(\d+)\.cross_attn\.([qkvo])_proj\.weight", "{x}.attn.{1}_proj.weight"),
    (r"model\.gated_cross_attn_layers\.(\d+)\.cross_attn\.([qk])_layer_norm\.weight", "{x}.attn.{1}_norm.weight"),
    (r"model\.gated_cross_attn_layers\.(\d+)\.post_attention_layernorm\.weight", "{x}.ff.norm.weight"),
    (r"model\.gated_cross_attn_layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "{x}.ff.{1}_proj.weight"),
    (r"model\.gated_cross_attn_layers\.(\d+)\.alpha_cross_attn", "{x}.attn_gate"),
    (r"model\.gated_cross_attn_layers\.(\d+)\.alpha_dense", "{x}.ff_gate"),
]


def rename(key: str, interval: int) -> str | None:
    """The interleaf name of IDEFICS parameter ``key`` (None for non-parameters like rotary caches)."""
    if key.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
        return None
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, key)
        if not m:
            continue
        groups = m.groups()
        if template.startswith("{x}"):
            layer = int(groups[0]) * interval
            prefix = f"language_model.lm.model.layers.{layer}.xattn"
            return template.format(*groups, x=prefix)
        if "{layer}" in template:
            layer, rest = int(groups[0]), groups[1]
            wrapped = layer % interval == 0
            return template.format(layer=f"{layer}.decoder_layer" if wrapped else layer, rest=rest)
        return template.format(*groups)
    raise ValueError(f"unexpected IDEFICS parameter {key!r}: no interleaf counterpart")


def convert(src: str | Path, dst: str | Path) -> Path:
    """Convert a directory written by ``IdeficsForVisionText2Text.save_pretrained`` (plus its
    tokenizer and image-processor files) into an interleaf checkpoint at ``dst``."""
    src = Path(src)
    cfg = _read_config(src)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    config = flamingo_config(cfg, tokenizer)
    state = {}
    for key, tensor in read_state_dict(src).items():
        new = rename(key, cfg.cross_layer_interval)
        if new is not None:
            state[new] = tensor.reshape(-1) if new.endswith(("attn_gate", "ff_gate")) else tensor
    model = meta_model(
        config, lm_config=lm_config(cfg), vision_tower=lambda: tower_from_config(cfg.vision_config), tokenizer=tokenizer
    )
    image_processor = transformers.AutoImageProcessor.from_pretrained(src)
    return write_checkpoint(dst, model, state, image_processor=image_processor, padding_side=tokenizer.padding_side)


def _read_config(src: Path) -> transformers.IdeficsConfig:
    file = src / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read the IDEFICS config: {e}") from None
    if data.get("model_type") != "idefics":
        raise ValueError(f"{file}: model_type is {data.get('model_type')!r}, not 'idefics'")
    return transformers.IdeficsConfig.from_pretrained(src)


def is_idefics(directory: Path) -> bool:
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type") == "idefics"
    except (OSError, json.JSONDecodeError):
        return False
