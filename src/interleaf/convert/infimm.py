"""InfiMM (``Infi-MM/infimm-zephyr``, ``infimm-llama13b``, ``infimm-vicuna13b``) -> interleaf.

An InfiMM release is one ``pytorch_model.bin`` holding the whole model under ``model.``: an
EVA-CLIP vision tower (``model.vision_encoder.*``, EVA-CLIP's own names), OpenFlamingo's
Perceiver (``model.perceiver.*``) and the language model with OpenFlamingo's gated
cross-attention (``model.lang_encoder.*``: every decoder layer wrapped as
``model.layers.N.decoder_layer``, blocks at ``model.layers.N.gated_cross_attn_layer``, and
possibly the same tensors again under ``old_decoder_blocks.N`` / ``gated_cross_attn_layers.N``).
Its ``config.json`` describes the tower (``visual``) and the LM (``language``, an inline HF
config); the rest is fixed by InfiMM's model files:

- the Perceiver: width of the tower, OpenFlamingo's head size 64 (depth, latents and heads
  are read from the weights), GELU feed-forward, no media or frame embeddings;
- cross-attention before every ``cross_attn_every_n_layers``-th decoder layer (offset n-1),
  head size 64, GELU feed-forward, LayerNorm (eps 1e-5), tanh scalar gates, each token seeing
  only the latest image before it; an EOS does not end an image's reach; a sample with no
  image at all is left untouched by every block (``without_media="skip"``: InfiMM multiplies
  both residual branches by "this sample has an image");
- the tower's features are the last block's output before the final norm, class token kept;
- prompts write an image as ``<|endofchunk|><image>``; a conversation opens with an empty
  system message when it has none and is tokenized with the tokenizer's BOS; a prompt with no
  image carries one black image (which no token sees).

Only data files are read (config, weights, tokenizer files); InfiMM's Python files are never
imported or executed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
import transformers
from huggingface_hub import snapshot_download
from PIL import Image

from interleaf.config import (
    CrossAttentionConfig,
    FlamingoConfig,
    LMConfig,
    ResamplerConfig,
    TokensConfig,
    VisionConfig,
)
from interleaf.convert import openflamingo
from interleaf.convert.common import convert_once, converted_directory, meta_model, read_state_dict, write_checkpoint
from interleaf.images import OpenClipImageProcessor
from interleaf.model.checkpoint import unique_state_dict
from interleaf.model.eva import EVA_PREFIXES, EvaVisionConfig, EvaVisionModel, from_eva_clip_state_dict
from interleaf.model.flamingo import Flamingo
from interleaf.tiny import build_llama_tokenizer

RELEASES = ("Infi-MM/infimm-zephyr", "Infi-MM/infimm-llama13b", "Infi-MM/infimm-vicuna13b")
# what a conversion downloads: data files only, never the repository's Python files
DATA_FILES = [
    "config.json",
    "pytorch_model*.bin*",
    "model*.safetensors*",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
]
DIM_HEAD = 64  # of the Perceiver and the cross-attention: fixed in InfiMM's (OpenFlamingo's) code
IMAGE, END_OF_CHUNK = "<image>", "<|endofchunk|>"
TOKENS = TokensConfig(image=IMAGE, end_of_chunk=END_OF_CHUNK, image_prompt=END_OF_CHUNK + IMAGE)
# InfiMM's processor: an empty system message first, the BOS from the tokenizer, a black image
# when a prompt has none
PROCESSOR_OPTIONS = {"chat_system": "", "chat_bos": "tokenizer", "placeholder_image": True}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# EVA-CLIP's names for its vision towers. InfiMM builds the tower from the explicit fields of
# ``visual`` whatever the name says; the name is checked so that a config meant for another
# model family fails here rather than loading into the wrong architecture.
EVA_MODEL_NAMES = ("eva-clip-b-16", "eva-clip-l-14", "eva-clip-l-14-336", "eva-clip-g-14", "eva-clip-g-14-x")
# ``visual`` fields: those that decide the tower, and those that do not change its inference
# output (training-only rates; the xformers and fused-LayerNorm kernels compute the same
# function; the CLIP head and pooling, which InfiMM's features never pass through).
_TOWER_FIELDS = {
    "image_size",
    "patch_size",
    "width",
    "layers",
    "head_width",
    "mlp_ratio",
    "qkv_bias",
    "rope",
    "pt_hw_seq_len",
    "intp_freq",
    "naiveswiglu",
    "subln",
    "ls_init_value",
    "eva_model_name",
    "postnorm",
    "timm_model_name",
}
_INERT_FIELDS = {
    "drop_path_rate",
    "patch_dropout",
    "xattn",
    "fusedLN",
    "embed_dim",
    "global_average_pool",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
}


def is_infimm(directory: Path) -> bool:
    """Whether ``directory`` holds an InfiMM release (a ``config.json`` with ``visual``,
    ``language`` and ``cross_attn_every_n_layers``); a ``config.json`` that is not JSON is an error."""
    file = directory / "config.json"
    try:
        data = json.loads(file.read_text())
    except OSError:
        return False
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from None
    return isinstance(data, dict) and "visual" in data and "language" in data and "cross_attn_every_n_layers" in data


def read_config(src: Path) -> dict:
    file = src / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read the InfiMM config: {e}") from None
    for key, kind in (
        ("visual", dict),
        ("language", dict),
        ("cross_attn_every_n_layers", int),
        ("eoc_token_id", int),
        ("image_token_id", int),
    ):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{file}: '{key}' must be a {kind.__name__}, got {data.get(key)!r}")
    return data


def eva_config(visual: dict, where: str = "config.json") -> EvaVisionConfig:
    """The tower InfiMM's ``EVAVisionTransformer`` builds from ``visual`` (LayerNorm eps 1e-6)."""
    unknown = sorted(set(visual) - _TOWER_FIELDS - _INERT_FIELDS)
    if unknown:
        raise ValueError(f"{where}: visual.{unknown[0]} is not a field interleaf knows for an EVA-CLIP tower")
    name = visual.get("eva_model_name")
    if name not in EVA_MODEL_NAMES:
        raise ValueError(
            f"{where}: visual.eva_model_name={name!r} is not a known EVA-CLIP vision tower; "
            f"known: {', '.join(EVA_MODEL_NAMES)}"
        )
    refusals = {
        "postnorm": "interleaf's EVA blocks normalise before attention and MLP (pre-norm)",
        "timm_model_name": "a timm tower is not an EVA-CLIP tower",
    }
    for field, why in refusals.items():
        if visual.get(field):
            raise ValueError(f"{where}: visual.{field}={visual[field]!r} is not supported: {why}")
    if visual.get("subln") and not visual.get("naiveswiglu"):
        raise ValueError(
            f"{where}: visual.subln=true with naiveswiglu=false is not supported (EVA-CLIP's GELU MLP "
            "normalises with eps 1e-5 where every other LayerNorm of the tower has 1e-6)"
        )
    if not isinstance(visual.get("image_size", 224), int) or not isinstance(visual.get("layers", 12), int):
        raise ValueError(f"{where}: visual.image_size and visual.layers must be integers")
    try:
        return EvaVisionConfig(
            image_size=visual.get("image_size", 224),
            patch_size=visual.get("patch_size", 16),
            width=visual.get("width", 768),
            layers=visual.get("layers", 12),
            head_width=visual.get("head_width", 64),
            mlp_ratio=visual.get("mlp_ratio", 4.0),
            qkv_bias=visual.get("qkv_bias", True),
            rope=visual.get("rope", False),
            pt_hw_seq_len=visual.get("pt_hw_seq_len", 16),
            intp_freq=visual.get("intp_freq", False),
            swiglu=visual.get("naiveswiglu", False),
            subln=visual.get("subln", False),
            layer_scale=visual.get("ls_init_value") or None,
            norm_eps=1e-6,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: visual: {e}") from None


def lm_config(language: dict, where: str = "config.json") -> transformers.PreTrainedConfig:
    model_type = language.get("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **{k: v for k, v in language.items() if k != "model_type"})
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: language (model_type {model_type!r}) is not a usable HF config: {e}") from None


def image_processor(size: int) -> OpenClipImageProcessor:
    """InfiMM's transform: shortest edge to ``size`` (bicubic), centre crop (torchvision's
    rounding), OpenAI CLIP's mean and std."""
    return OpenClipImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


# InfiMM key -> OpenFlamingo's alias names for the same LM tensors, which openflamingo.py maps
_WRAPPED = re.compile(
    r"lang_encoder\.(?P<layers>.+)\.(?P<n>\d+)\.(?P<part>decoder_layer|gated_cross_attn_layer)\.(?P<rest>.+)"
)
_ALIAS = {"decoder_layer": "old_decoder_blocks", "gated_cross_attn_layer": "gated_cross_attn_layers"}
_ROTARY = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def canonical_state(state: dict[str, torch.Tensor], file: str) -> dict[str, torch.Tensor]:
    """The checkpoint without its ``model.`` prefix and with every LM layer tensor under one name
    (OpenFlamingo's ``old_decoder_blocks.N`` / ``gated_cross_attn_layers.N``), whichever of the two
    names the file used; a tensor stored under both must be the same."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith("model."):
            raise ValueError(f"{file}: unexpected InfiMM parameter {key!r}: every key starts with 'model.'")
        name = key.removeprefix("model.")
        if name.endswith(_ROTARY):
            continue
        if m := _WRAPPED.fullmatch(name):
            name = f"lang_encoder.{_ALIAS[m['part']]}.{m['n']}.{m['rest']}"
        if name in out and not torch.equal(out[name], tensor):
            raise ValueError(f"{file}: {key!r} and its alias hold different tensors")
        out[name] = tensor
    return out


def map_state(state: dict[str, torch.Tensor], model, file: str) -> dict[str, torch.Tensor]:
    """Canonical InfiMM tensors (see :func:`canonical_state`) under interleaf names."""
    for key in state:
        if not key.startswith(("vision_encoder.", "perceiver.", "lang_encoder.")):
            raise ValueError(f"{file}: unexpected InfiMM parameter 'model.{key}': no interleaf counterpart")
    vision = {f"vision.tower.{k}": v for k, v in from_eva_clip_state_dict(state, "vision_encoder.").items()}
    flamingo = {k: v for k, v in state.items() if not k.startswith("vision_encoder.")}
    mapped, rest = openflamingo.map_state(flamingo, model)
    layers_path = model.language_model.layers_path
    layers = model.language_model.lm.get_submodule(layers_path)
    wrapped = {i for i, layer in enumerate(layers) if hasattr(layer, "xattn")}
    for key in rest:
        if m := re.fullmatch(r"lang_encoder\.old_decoder_blocks\.(\d+)\.(.+)", key):
            n = int(m.group(1))
            layer = f"{n}.decoder_layer" if n in wrapped else str(n)
            mapped[f"language_model.lm.{layers_path}.{layer}.{m.group(2)}"] = state[key]
        elif key.startswith("lang_encoder."):
            mapped[f"language_model.lm.{key.removeprefix('lang_encoder.')}"] = state[key]
        else:
            raise ValueError(f"{file}: unexpected InfiMM parameter 'model.{key}': no interleaf counterpart")
    return {**vision, **mapped}


def flamingo_config(state: dict[str, torch.Tensor], *, width: int, interval: int, num_layers: int) -> FlamingoConfig:
    """The Flamingo of InfiMM's model files; sizes its config does not state are read from the
    (canonical) weights, falling back to InfiMM's values where a tensor is missing, so that a
    checkpoint with missing tensors still builds the model whose names the error then lists."""

    def rows(pattern: str, default: int) -> int:
        shapes = [state[k].shape for k in sorted(state) if re.fullmatch(pattern, k)]
        return shapes[0][0] if shapes else default

    blocks = {int(m.group(1)) for k in state if (m := re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.", k))}
    expected = {i for i in range(num_layers) if (i + 1) % interval == 0}
    for n in range(1, num_layers + 1):  # the weights say "every n-th layer", for another n
        if n != interval and blocks == {i for i in range(num_layers) if (i + 1) % n == 0}:
            raise ValueError(f"cross_attn_every_n_layers={interval}, but the weights have a block every {n}")
    if blocks - expected:
        raise ValueError(
            f"cross_attn_every_n_layers={interval} puts blocks before layers {sorted(expected)} of {num_layers}, "
            f"but the weights have blocks at {sorted(blocks)}"
        )
    perceiver = r"perceiver\.layers\.\d+\."
    block = r"lang_encoder\.gated_cross_attn_layers\.\d+\."
    return FlamingoConfig(
        vision=VisionConfig(layer=-1, post_layernorm=False, drop_cls=False),
        lm=LMConfig(new_token_embeddings="resize"),
        resampler=ResamplerConfig(
            depth=len({m.group(1) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))}) or 6,
            num_latents=rows(r"perceiver\.latents", 64),
            heads=rows(perceiver + r"0\.to_q\.weight", 8 * DIM_HEAD) // DIM_HEAD,
            head_dim=DIM_HEAD,
            ff_mult=rows(perceiver + r"1\.1\.weight", 4 * width) // width,
            activation="gelu",
        ),
        cross_attention=CrossAttentionConfig(
            interval=interval,
            offset=interval - 1,
            heads=rows(block + r"attn\.to_q\.weight", 8 * DIM_HEAD) // DIM_HEAD,
            head_dim=DIM_HEAD,
            ff_mult=4,
            activation="gelu",
            norm="layernorm",
            gate="scalar",
            media_attention="last",
            without_media="skip",
        ),
        tokens=TOKENS,
    )


def upstream_name(name: str, layers_path: str) -> str:
    """The InfiMM key an interleaf parameter comes from (for naming missing tensors)."""
    if name.startswith("vision.tower."):
        rest = name.removeprefix("vision.tower.")
        for old, new in EVA_PREFIXES:
            if rest.startswith(new):
                rest = old + rest[len(new) :]
                break
        return f"model.vision_encoder.{rest}"
    if m := re.fullmatch(r"resampler\.layers\.(\d+)\.(.+)", name):
        part = m.group(2)
        for ours, theirs in (
            ("attn.q_proj", "0.to_q"),
            ("attn.k_proj", "0.to_kv"),
            ("attn.v_proj", "0.to_kv"),
            ("attn.o_proj", "0.to_out"),
            ("norm_media", "0.norm_media"),
            ("norm_latents", "0.norm_latents"),
            ("ff.norm", "1.0"),
            ("ff.up_proj", "1.1"),
            ("ff.down_proj", "1.3"),
        ):
            if part.startswith(ours + "."):
                return f"model.perceiver.layers.{m.group(1)}.{theirs}{part[len(ours) :]}"
    if name.startswith("resampler."):
        return "model.perceiver." + name.removeprefix("resampler.")
    lm = name.removeprefix("language_model.lm.")
    if m := re.fullmatch(re.escape(layers_path) + r"\.(\d+)\.xattn\.(.+)", lm):
        part = m.group(2)
        for ours, theirs in (
            ("norm", "attn.norm"),
            ("attn.q_proj", "attn.to_q"),
            ("attn.k_proj", "attn.to_kv"),
            ("attn.v_proj", "attn.to_kv"),
            ("attn.o_proj", "attn.to_out"),
            ("ff.norm", "ff.0"),
            ("ff.up_proj", "ff.1"),
            ("ff.down_proj", "ff.3"),
        ):
            if part.startswith(ours + "."):
                part = theirs + part[len(ours) :]
                break
        return f"model.lang_encoder.{layers_path}.{m.group(1)}.gated_cross_attn_layer.{part}"
    if m := re.fullmatch(re.escape(layers_path) + r"\.(\d+)\.(?:decoder_layer\.)?(.+)", lm):
        return f"model.lang_encoder.{layers_path}.{m.group(1)}.decoder_layer.{m.group(2)}"
    return f"model.lang_encoder.{lm}"


def convert(src: str | Path, dst: str | Path) -> Path:
    """Convert an InfiMM directory (``config.json``, ``pytorch_model.bin``, tokenizer files) into
    an interleaf checkpoint at ``dst``."""
    src = Path(src)
    cfg = read_config(src)
    where = str(src / "config.json")
    tower = eva_config(cfg["visual"], where)
    language = lm_config(cfg["language"], where)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # not: "a model of type infimm-zephyr" (it reads config.json)
    try:  # tokenizer_config.json names the class; InfiMM's auto_map (remote code) is never followed
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{src}: cannot load the tokenizer: {e}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    for token, key in ((END_OF_CHUNK, "eoc_token_id"), (IMAGE, "image_token_id")):
        if tokenizer.convert_tokens_to_ids(token) != cfg[key]:
            raise ValueError(
                f"{src}: the tokenizer's {token!r} is id {tokenizer.convert_tokens_to_ids(token)}, "
                f"but config.json says {key}={cfg[key]}"
            )
    raw = read_state_dict(src)
    file = str(src / "pytorch_model.bin")
    interval = cfg["cross_attn_every_n_layers"]
    state = canonical_state(raw, file)
    config = flamingo_config(state, width=tower.width, interval=interval, num_layers=language.num_hidden_layers)
    model = meta_model(config, lm_config=language, vision_tower=lambda: EvaVisionModel(tower), tokenizer=tokenizer)
    mapped = map_state(state, model, file)
    expected = set(unique_state_dict(model))
    layers_path = model.language_model.layers_path
    missing = sorted({upstream_name(k, layers_path) for k in expected - set(mapped)})
    if missing:
        raise ValueError(f"{file}: {len(missing)} missing InfiMM tensor(s): " + ", ".join(missing))
    shapes = unique_state_dict(model)
    wrong = sorted(
        f"{upstream_name(k, layers_path)} {tuple(mapped[k].shape)}, config.json says {tuple(shapes[k].shape)}"
        for k in expected
        if mapped[k].shape != shapes[k].shape
    )
    if wrong:
        raise ValueError(f"{file}: {len(wrong)} tensor(s) of the wrong shape: " + "; ".join(wrong))
    return write_checkpoint(
        dst,
        model,
        {k: v for k, v in mapped.items() if k in expected},
        image_processor=image_processor(tower.grid_size[0] * tower.patch_size),
        padding_side=tokenizer.padding_side,
        **PROCESSOR_OPTIONS,
    )


def download(repo: str) -> Path:
    """A hub snapshot of an InfiMM repo's data files: its Python files are not even fetched."""
    try:
        return Path(snapshot_download(repo, allow_patterns=DATA_FILES))
    except Exception as e:  # network, auth and repo errors all mean: not loadable
        raise ValueError(f"cannot download {repo}: {e}") from None


def release_directory(path: str) -> Path | None:
    """For a local InfiMM directory or one of :data:`RELEASES`, its converted checkpoint (made
    on first use, in the cache; reused while the source files are unchanged)."""
    local = Path(path)
    if local.is_dir():
        if not is_infimm(local):
            return None
        root = local
    elif path in RELEASES:
        root = download(path)
    else:
        return None
    return convert_once(converted_directory("infimm", root), lambda dst: convert(root, dst))


# A tiny InfiMM release, to try the conversion and every command on it offline.
TINY_VISUAL = {
    "image_size": 32,
    "layers": 2,
    "width": 32,
    "head_width": 8,
    "patch_size": 8,
    "mlp_ratio": 2.6667,
    "eva_model_name": "eva-clip-l-14-336",
    "drop_path_rate": 0.0,
    "xattn": False,
    "fusedLN": True,
    "rope": True,
    "pt_hw_seq_len": 16,
    "intp_freq": True,
    "naiveswiglu": True,
    "subln": True,
    "embed_dim": 24,
}


def tiny_model(seed: int = 0):
    """A random tiny InfiMM-Zephyr as an interleaf model (Mistral LM of 4 layers, 2-layer EVA02
    tower, 1-layer resampler, open gates), with the ``config.json`` InfiMM would ship for it."""
    tokenizer = build_llama_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE]})
    language = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "vocab_size": len(tokenizer),
    }
    torch.manual_seed(seed)
    tower = EvaVisionModel(eva_config(TINY_VISUAL))
    lm = transformers.AutoModelForCausalLM.from_config(lm_config(language))
    config = flamingo_config({}, width=TINY_VISUAL["width"], interval=2, num_layers=4)
    config = dataclasses.replace(config, resampler=dataclasses.replace(config.resampler, depth=1, num_latents=8))
    model = Flamingo(config, lm=lm, vision_tower=tower, tokenizer=tokenizer).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn_gate.uniform_(0.5, 1.0)
            block.ff_gate.uniform_(0.5, 1.0)
    release = {
        "architectures": ["InfiMMZephyrModel"],
        "model_type": "infimm-zephyr",
        "cross_attn_every_n_layers": 2,
        "eoc_token_id": tokenizer.convert_tokens_to_ids(END_OF_CHUNK),
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE),
        "visual": TINY_VISUAL,
        "language": language,
    }
    return model, release


def write_tiny(directory: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_model` in InfiMM's release layout: ``config.json``, one
    ``pytorch_model.bin`` under ``model.`` with EVA-CLIP names and the alias keys a
    ``torch.save(state_dict())`` of InfiMM's model holds, and the tokenizer files."""
    model, release = tiny_model(seed)
    layers_path = model.language_model.layers_path
    state: dict[str, torch.Tensor] = {}
    for name, tensor in unique_state_dict(model).items():
        key = upstream_name(name, layers_path)
        if name.endswith(("k_proj.weight", "v_proj.weight")) and key.endswith("to_kv.weight"):
            state[key] = torch.cat([state.get(key, tensor.new_empty(0, tensor.shape[1])), tensor])  # k, then v
        else:
            state[key] = tensor.clone()
    for key in list(state):
        if m := _WRAPPED.fullmatch(key.removeprefix("model.")):
            state[f"model.lang_encoder.{_ALIAS[m['part']]}.{m['n']}.{m['rest']}"] = state[key]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(release, indent=2) + "\n")
    model.tokenizer.save_pretrained(directory)
    return directory
