"""OpenFlamingo ``checkpoint.pt`` + its language model + its vision encoder -> interleaf.

An OpenFlamingo release (OpenFlamingo-3B/4B/9B) ships only the trained weights: the Perceiver,
the gated cross-attention blocks and the LM's (resized) embedding matrices, usually with each
block stored twice (``lang_encoder.gated_cross_attn_layers.N`` and the ``FlamingoLayer``
alias). The language model comes from its own hub id; the vision encoder is open_clip's
ViT-L/14 "openai", whose weights are those of the Hugging Face CLIP
``openai/clip-vit-large-patch14``. OpenFlamingo reads open_clip's ``tokens`` output: with the
open_clip releases it was trained with (<= 2.20) that is the last encoder layer's patch
tokens without the final LayerNorm and without the class token, i.e.
``VisionConfig(drop_cls=True, post_layernorm=False)``.

The result is a trainable-only interleaf checkpoint that names the LM and vision sources.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import transformers
from huggingface_hub import hf_hub_download

from interleaf.config import (
    CrossAttentionConfig,
    FlamingoConfig,
    LMConfig,
    ResamplerConfig,
    TokensConfig,
    VisionConfig,
)
from interleaf.convert.common import convert_once
from interleaf.hub import cache_root
from interleaf.model.checkpoint import load_lm_and_tokenizer
from interleaf.model.flamingo import Flamingo
from interleaf.model.lm import find_decoder_layers
from interleaf.model.vision import load_tower
from interleaf.tokens import add_special_tokens

DIM_HEAD = 64  # OpenFlamingo fixes the head size of its Perceiver and cross-attention
VISION = "openai/clip-vit-large-patch14"

# The releases whose language model transformers implements: hub repo -> (LM, interval).
# (OpenFlamingo-3B's MPT-1B is MosaicML remote code, not transformers' MPT.)
RELEASES = {
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": ("togethercomputer/RedPajama-INCITE-Base-3B-v1", 2),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": ("togethercomputer/RedPajama-INCITE-Instruct-3B-v1", 2),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": ("anas-awadalla/mpt-7b", 4),
}
OF_TOKENS = ("<|endofchunk|>", "<image>")  # added in this order by OpenFlamingo


def read_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"{file}: cannot read an OpenFlamingo checkpoint: {e}") from None
    if isinstance(state, dict) and "model_state_dict" in state:  # a training checkpoint
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def infer_interval(state: dict[str, torch.Tensor], num_layers: int) -> int:
    """``cross_attn_every_n_layers`` from which decoder layers carry a block."""
    found = sorted(
        {int(m.group(1)) for k in state if (m := re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.", k))}
    )
    if not found:
        raise ValueError("the checkpoint has no lang_encoder.gated_cross_attn_layers.* weights")
    for n in range(1, num_layers + 1):
        if found == [i for i in range(num_layers) if (i + 1) % n == 0]:
            return n
    raise ValueError(f"cross-attention at layers {found} of {num_layers} is not 'every n-th layer'")


def flamingo_config(state, *, lm: str, vision: str, interval: int, layers_path: str | None) -> FlamingoConfig:
    depth = len({m.group(1) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))})
    latents = state["perceiver.latents"]
    dim = latents.shape[1]
    block = f"lang_encoder.gated_cross_attn_layers.{interval - 1}."
    return FlamingoConfig(
        lm=LMConfig(source=lm, layers_path=layers_path, new_token_embeddings="resize"),
        vision=VisionConfig(source=vision, layer=-1, post_layernorm=False, drop_cls=True),
        resampler=ResamplerConfig(
            depth=depth,
            num_latents=latents.shape[0],
            heads=state["perceiver.layers.0.0.to_q.weight"].shape[0] // DIM_HEAD,
            head_dim=DIM_HEAD,
            ff_mult=state["perceiver.layers.0.1.1.weight"].shape[0] // dim,
            activation="gelu",
            max_media=state["perceiver.media_time_embs"].shape[0] if "perceiver.media_time_embs" in state else 0,
            max_frames=state["perceiver.frame_embs"].shape[0] if "perceiver.frame_embs" in state else 0,
        ),
        cross_attention=CrossAttentionConfig(
            interval=interval,
            offset=interval - 1,
            heads=state[block + "attn.to_q.weight"].shape[0] // DIM_HEAD,
            head_dim=DIM_HEAD,
            ff_mult=state[block + "ff.1.weight"].shape[0] // state[block + "ff.1.weight"].shape[1],
            activation="gelu",
            norm="layernorm",
            gate="scalar",
            media_attention="last",
        ),
        tokens=TokensConfig(),
    )


_PERCEIVER = [
    (r"perceiver\.latents", "resampler.latents"),
    (r"perceiver\.frame_embs", "resampler.frame_embs"),
    (r"perceiver\.norm\.(\w+)", "resampler.norm.{0}"),
    (r"perceiver\.layers\.(\d+)\.0\.(norm_media|norm_latents)\.(\w+)", "resampler.layers.{0}.{1}.{2}"),
    (r"perceiver\.layers\.(\d+)\.0\.to_q\.weight", "resampler.layers.{0}.attn.q_proj.weight"),
    (r"perceiver\.layers\.(\d+)\.0\.to_kv\.weight", "resampler.layers.{0}.attn.{{k,v}}_proj.weight"),
    (r"perceiver\.layers\.(\d+)\.0\.to_out\.weight", "resampler.layers.{0}.attn.o_proj.weight"),
    (r"perceiver\.layers\.(\d+)\.1\.0\.(\w+)", "resampler.layers.{0}.ff.norm.{1}"),
    (r"perceiver\.layers\.(\d+)\.1\.1\.weight", "resampler.layers.{0}.ff.up_proj.weight"),
    (r"perceiver\.layers\.(\d+)\.1\.3\.weight", "resampler.layers.{0}.ff.down_proj.weight"),
]
_BLOCK = [
    (r"attn\.norm\.(\w+)", "norm.{0}"),
    (r"attn\.to_q\.weight", "attn.q_proj.weight"),
    (r"attn\.to_kv\.weight", "attn.{{k,v}}_proj.weight"),
    (r"attn\.to_out\.weight", "attn.o_proj.weight"),
    (r"attn_gate", "attn_gate"),
    (r"ff_gate", "ff_gate"),
    (r"ff\.0\.(\w+)", "ff.norm.{0}"),
    (r"ff\.1\.weight", "ff.up_proj.weight"),
    (r"ff\.3\.weight", "ff.down_proj.weight"),
]


def map_state(state: dict[str, torch.Tensor], model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenFlamingo tensors under interleaf names; also the backbone keys that were skipped."""
    layers_path = model.language_model.layers_path
    embeddings = {
        name: param
        for name, param in model.language_model.lm.named_parameters()
        if param is model.language_model.lm.get_input_embeddings().weight
        or param is model.language_model.lm.get_output_embeddings().weight
    }
    out, skipped = {}, []
    for key, tensor in state.items():
        if key == "perceiver.media_time_embs":
            out["resampler.media_embs"] = tensor.reshape(tensor.shape[0], -1)
            continue
        if m := re.fullmatch(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)", key):
            prefix = f"language_model.lm.{layers_path}.{m.group(1)}.xattn."
            _put(out, key, m.group(2), _BLOCK, prefix, tensor)
            continue
        if key.startswith("perceiver."):
            _put(out, key, key, _PERCEIVER, "", tensor)
            continue
        rest = key.removeprefix("lang_encoder.")
        if rest in embeddings:
            out[f"language_model.lm.{rest}"] = tensor
        elif key.startswith(("lang_encoder.", "vision_encoder.")):
            skipped.append(key)  # FlamingoLayer aliases and frozen backbone weights
        else:
            raise ValueError(f"unexpected OpenFlamingo parameter {key!r}: no interleaf counterpart")
    return out, skipped


def _put(out: dict, key: str, name: str, rules, prefix: str, tensor: torch.Tensor) -> None:
    for pattern, template in rules:
        if m := re.fullmatch(pattern, name):
            target = prefix + template.format(*m.groups())
            if "{k,v}" in target:
                k, v = tensor.chunk(2, dim=0)
                out[target.replace("{k,v}", "k")], out[target.replace("{k,v}", "v")] = k, v
            else:
                out[target] = tensor
            return
    raise ValueError(f"unexpected OpenFlamingo parameter {key!r}: no interleaf counterpart")


def convert(
    checkpoint: str | Path,
    dst: str | Path,
    *,
    lm: str,
    vision: str = VISION,
    cross_attn_every_n_layers: int | None = None,
    layers_path: str | None = None,
) -> Path:
    """Write an interleaf checkpoint for an OpenFlamingo ``checkpoint.pt`` over ``lm``
    (hub id or directory of the HF causal LM) and ``vision`` (an HF CLIP vision tower)."""
    state = read_checkpoint(Path(checkpoint))
    language_model, tokenizer = load_lm_and_tokenizer(lm)
    path, layers = find_decoder_layers(language_model, layers_path)
    interval = infer_interval(state, len(layers))
    if cross_attn_every_n_layers not in (None, interval):
        raise ValueError(
            f"cross_attn_every_n_layers={cross_attn_every_n_layers}, but the checkpoint has a block every {interval}"
        )
    base_rows = language_model.get_input_embeddings().num_embeddings
    add_special_tokens(tokenizer, OF_TOKENS)  # OpenFlamingo's ids: <|endofchunk|>, then <image>, then <PAD>
    config = flamingo_config(state, lm=lm, vision=vision, interval=interval, layers_path=path)
    image_processor = transformers.AutoImageProcessor.from_pretrained(vision)
    model = Flamingo(
        config, lm=language_model, vision_tower=load_tower(vision), tokenizer=tokenizer, image_processor=image_processor
    )
    mapped, _ = map_state(state, model)
    output = model.language_model.lm.get_output_embeddings().weight
    with torch.no_grad():  # untrained new output rows (not in the release): the mean row, not noise
        output[base_rows:] = output[:base_rows].mean(0)
    required = set(model.trainable_names)
    # OpenFlamingo never trained an untied output matrix, and only releases it when its name
    # says "embed" (GPT-NeoX's embed_out); otherwise the LM's rows plus the mean rows stand.
    required -= {n for n, p in model.named_parameters() if p is output and n not in mapped}
    missing, unexpected = sorted(required - set(mapped)), sorted(set(mapped) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not fit {lm}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(mapped, strict=False)
    model.save_pretrained(dst, trainable_only=True)
    return Path(dst)


def release_checkpoint(repo: str) -> Path | None:
    """For a known OpenFlamingo hub repo, its converted checkpoint (made on first use)."""
    if repo not in RELEASES:
        return None
    target = cache_root() / "converted" / repo.replace("/", "--")
    if target.is_dir():
        return target
    lm, interval = RELEASES[repo]
    try:
        checkpoint = hf_hub_download(repo, "checkpoint.pt")
    except Exception as e:  # network, auth and repo errors all mean: not loadable
        raise ValueError(f"cannot download {repo}/checkpoint.pt: {e}") from None
    return convert_once(
        target, lambda dst: convert(checkpoint, dst, lm=lm, vision=VISION, cross_attn_every_n_layers=interval)
    )
