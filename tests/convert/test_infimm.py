"""InfiMM: conversion, parity of the whole model with the reference composition, the prompt format.

The reference. InfiMM's Flamingo is OpenFlamingo's model code with one change (its
``helpers.py``): ``GatedCrossAttentionBlock`` multiplies both residual branches by whether the
sample has any image in its ``media_locations``. So the reference is open-flamingo 2.0.1's
own model code (installed without its dependencies, as in ``test_openflamingo``) with that one
forward restated below, timm's ``Eva`` as the vision tower (loaded from the same EVA-CLIP
weights; see ``evahelp``) and the same Hugging Face Mistral. The tiny checkpoint is written in
InfiMM's exact layout: one ``pytorch_model.bin`` under ``model.``, EVA-CLIP names for the
tower, every decoder layer wrapped, alias keys beside the canonical ones, and a ``config.json``
of InfiMM's form (``visual``, an inline ``language``).

The prompt format is restated from InfiMM's ``processing_infimm_zephyr.py`` (its processor
imports torchvision, so it cannot run here) and applied with a Llama tokenizer (Metaspace,
BOS added by the tokenizer) carrying Zephyr's chat template as InfiMM ships it.
"""

import json
import re
import sys
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from interleaf import Flamingo, Processor
from interleaf.convert import infimm
from interleaf.model.eva import EvaVisionModel
from interleaf.tiny import build_llama_tokenizer

from evahelp import eva_clip_names, reference, timm_eva

sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))
try:
    from open_flamingo.src import flamingo as of_flamingo
    from open_flamingo.src import flamingo_lm as of_lm
    from open_flamingo.src import helpers as of_helpers
    from open_flamingo.src import utils as of_utils
except ImportError:  # make test installs it
    of_flamingo = None
needs_reference = pytest.mark.skipif(of_flamingo is None or timm_eva is None, reason="open-flamingo or timm missing")

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SIZE = 16  # the tiny tower's image size (InfiMM-Zephyr: 336)
VISUAL = {**infimm.TINY_VISUAL, "image_size": SIZE, "patch_size": 4}  # a 4 x 4 patch grid


def llama_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A Llama tokenizer with Zephyr's template and InfiMM's two tokens after the base vocabulary."""
    tok = build_llama_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    return tok


def language_config(vocab_size: int) -> dict:
    """``config.json``'s ``language``, in the form InfiMM writes it (transformers 4.35 keys)."""
    return {
        "_name_or_path": "HuggingFaceH4/zephyr-7b-beta",
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 512,
        "model_type": "mistral",
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.35.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def random_tower() -> EvaVisionModel:
    torch.manual_seed(0)
    tower = EvaVisionModel(infimm.eva_config(VISUAL)).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.3)
    return tower


class TimmTower(torch.nn.Module):
    """``vision_encoder.visual`` as OpenFlamingo calls it (``(pooled, tokens)``), returning what
    InfiMM's ``forward_features(x, return_all_features=True)`` does: every token of the last
    block, before the final norm."""

    def __init__(self, tower: EvaVisionModel):
        super().__init__()
        self.eva = reference(tower)
        self.eva.norm = torch.nn.Identity()

    def forward(self, pixels):
        tokens = self.eva.forward_features(pixels)
        return tokens[:, 0], tokens


def infimm_block_forward(self, x, media, media_locations=None, use_cached_media=False):
    """InfiMM's GatedCrossAttentionBlock.forward: OpenFlamingo's, with both residual branches
    multiplied by whether the sample has an image at all."""
    flag = 1.0 if media_locations is None else media_locations.any(-1).to(x.dtype)[:, None, None]
    x = (
        flag
        * self.attn(x, media, media_locations=media_locations, use_cached_media=use_cached_media)
        * (self.attn_gate.tanh())
        + x
    )
    return flag * self.ff(x) * self.ff_gate.tanh() + x


def build_reference(tok, language: dict, tower: EvaVisionModel):
    torch.manual_seed(1)
    lang = transformers.MistralForCausalLM(transformers.MistralConfig(**language))
    of_utils.extend_instance(lang, of_lm.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    vision = types.SimpleNamespace(visual=TimmTower(tower))
    model = of_flamingo.Flamingo(
        vision,
        lang,
        tok.convert_tokens_to_ids("<|endofchunk|>"),
        tok.convert_tokens_to_ids("<image>"),
        vis_dim=VISUAL["width"],
        cross_attn_every_n_layers=2,
    )
    model.perceiver = of_helpers.PerceiverResampler(dim=VISUAL["width"], depth=1, num_latents=8)
    infimm_block = type("InfiMMBlock", (of_helpers.GatedCrossAttentionBlock,), {"forward": infimm_block_forward})
    with torch.no_grad():
        for block in lang.gated_cross_attn_layers:
            if block is not None:
                block.__class__ = infimm_block
                block.attn_gate.copy_(torch.randn(1))
                block.ff_gate.copy_(torch.randn(1))
    return model.eval()


def write_infimm(directory, reference_model, tower, tok, *, keys: str = "both", **config_overrides):
    """The checkpoint in InfiMM's layout. ``keys``: "both" (canonical and alias names, as
    ``torch.save(model.state_dict())`` writes them), "canonical" or "alias" only."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in reference_model.state_dict().items():
        if key.startswith("vision_encoder."):
            continue  # timm's names; InfiMM's file holds EVA-CLIP's
        alias = key.startswith(("lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers."))
        wrapped = ".decoder_layer." in key or ".gated_cross_attn_layer." in key
        if (keys == "canonical" and alias) or (keys == "alias" and wrapped):
            continue
        state[f"model.{key}"] = value.clone()
    head = {"head.weight": torch.randn(VISUAL["embed_dim"], VISUAL["width"]), "head.bias": torch.zeros(24)}
    for key, value in {**eva_clip_names(tower), **head}.items():
        state[f"model.vision_encoder.{key}"] = value.clone()
    torch.save(state, directory / "pytorch_model.bin")
    config = {
        "architectures": ["InfiMMZephyrModel"],
        "auto_map": {
            "AutoConfig": "configuration_infimm_zephyr.InfiMMConfig",
            "AutoModelForCausalLM": "modeling_infimm_zephyr.InfiMMZephyrModel",
        },
        "model_type": "infimm-zephyr",
        "cross_attn_every_n_layers": 2,
        "image_token_id": tok.convert_tokens_to_ids("<image>"),
        "eoc_token_id": tok.convert_tokens_to_ids("<|endofchunk|>"),
        "visual": dict(VISUAL),
        "language": language_config(len(tok)),
        **config_overrides,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(directory)
    # InfiMM's remote code: the converter must never import it
    for name in ("modeling_infimm_zephyr.py", "configuration_infimm_zephyr.py"):
        (directory / name).write_text("raise RuntimeError('InfiMM remote code was executed')\n")
    return directory


@pytest.fixture(scope="module")
def infimm_dir(tmp_path_factory):
    if of_flamingo is None or timm_eva is None:
        pytest.skip("open-flamingo or timm missing (make test installs them)")
    tok = llama_tokenizer()
    tower = random_tower()
    ref = build_reference(tok, language_config(len(tok)), tower)
    root = tmp_path_factory.mktemp("infimm")
    src = write_infimm(root / "src", ref, tower, tok)
    return types.SimpleNamespace(root=root, src=src, reference=ref, tower=tower, tok=tok)


@pytest.fixture(scope="module")
def converted(infimm_dir):
    dst = infimm.convert(infimm_dir.src, infimm_dir.root / "dst")
    return Flamingo.from_pretrained(dst), Processor.from_pretrained(dst)


def picture(seed: int, size=(23, 16)) -> Image.Image:
    """23 x 16: the long side stays 23, 7 over the crop, where torchvision's centre crop (offset
    round(3.5) = 4) and HF's (floor: 3) differ; InfiMM's is torchvision's."""
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def conversations():
    """Several images in one message, a text-only conversation (the shortest: padded), and a
    user system message with a multi-turn history (the later turns still see the image
    across the ``</s>`` that ends each turn)."""
    return [
        [{"role": "user", "content": [{"image": picture(0)}, "what is in the picture?", {"image": picture(1)}]}],
        [{"role": "user", "content": "how many?"}],
        [
            {"role": "system", "content": "answer briefly."},
            {"role": "user", "content": [{"image": picture(2)}, "what colour is the shape?"]},
            {"role": "assistant", "content": "red."},
            {"role": "user", "content": "is there a circle?"},
        ],
    ]


@needs_reference
def test_logits_and_greedy_generation_equal_the_reference(converted, infimm_dir):
    model, processor = converted
    ref = infimm_dir.reference
    assert model.config.cross_attention.without_media == "skip"
    batch = processor(conversations())
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    assert pixels.shape == (3, 2, 3, SIZE, SIZE) and mask[1, 0] == 0  # left padding in the text-only row
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = ref(vision_x=pixels[:, :, None], lang_x=ids, attention_mask=mask).logits
    real = mask.bool()
    diff = (ours - theirs)[real].abs().max().item()
    assert diff <= 1e-4, diff  # float32, the same operations up to summation order
    with torch.no_grad():
        other = model(**dict(batch, pixel_values=torch.randn_like(pixels))).logits
    changed = (other - ours).abs().amax(-1)
    assert changed[0][real[0]].max() > 1e-2 and changed[2][real[2]].max() > 1e-2  # the images matter
    # and reach no sample without one, not even through the feed-forward: that row's computation
    # is the same in both calls (same shapes, its own values unchanged), so exactly 0
    assert changed[1].max() == 0

    steps = 6
    generated = model.generate(**batch, max_new_tokens=steps)
    lang, att, gaps = ids, mask, []
    with torch.no_grad():  # the reference's greedy search: a full forward per token
        for _ in range(steps):
            logits = ref(vision_x=pixels[:, :, None], lang_x=lang, attention_mask=att).logits[:, -1]
            top = logits.topk(2).values
            gaps.append((top[:, 0] - top[:, 1]).min().item())
            lang = torch.cat([lang, logits.argmax(-1, keepdim=True)], 1)
            att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
    expected = lang[:, ids.shape[1] :]
    eos = model.tokenizer.eos_token_id
    for row in range(3):
        want = expected[row].tolist()
        want = want[: want.index(eos) + 1] if eos in want else want
        assert generated[row, : len(want)].tolist() == want, row
    # exact equality is safe: the smallest top-2 gap the reference met is far above the logit difference
    assert min(gaps) > 10 * diff, (min(gaps), diff)


@needs_reference
@pytest.mark.parametrize("keys", ["canonical", "alias"])
def test_either_key_form_converts_to_the_same_checkpoint(infimm_dir, converted, tmp_path, keys):
    src = write_infimm(tmp_path / "src", infimm_dir.reference, infimm_dir.tower, infimm_dir.tok, keys=keys)
    model = Flamingo.from_pretrained(infimm.convert(src, tmp_path / "dst"))
    reference_state = converted[0].state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference_state[name]), name


def infimm_prompt(tok, messages, *, duplicate_non_user: bool = False) -> list[int]:
    """InfiMM's processor, restated: images of user messages become ``<|endofchunk|><image>``,
    pieces joined without a separator; an empty system message first unless there is one; the
    chat template with the generation prompt; tokenized with the tokenizer's special tokens.
    ``duplicate_non_user`` reproduces its bug: every non-user message is appended twice, the
    second time as a user message."""
    rounds = []
    for message in messages:
        if message["role"] != "user":
            rounds.append(message)
            if not duplicate_non_user:
                continue
        content = message["content"]
        pieces = content if isinstance(content, list) else [content]
        text = "".join("<|endofchunk|><image>" if isinstance(p, dict) else p for p in pieces)
        rounds.append({"role": "user", "content": text})
    if rounds[0]["role"] != "system":
        rounds.insert(0, {"role": "system", "content": ""})
    text = tok.apply_chat_template(rounds, tokenize=False, add_generation_prompt=True)
    return tok(text, truncation=True, max_length=2048)["input_ids"]


def infimm_pixels(image: Image.Image) -> np.ndarray:
    """InfiMM's image transform, restated with PIL and numpy: shortest edge to SIZE (bicubic),
    centre crop (torchvision's rounding), RGB, /255, OpenAI CLIP mean and std."""
    w, h = image.size
    scale = SIZE / min(w, h)
    new = (SIZE, int(SIZE * h / w)) if w <= h else (int(SIZE * w / h), SIZE)
    assert scale > 0
    resized = image.resize(new, Image.Resampling.BICUBIC)
    top, left = round((new[1] - SIZE) / 2), round((new[0] - SIZE) / 2)
    crop = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)).convert("RGB"), dtype=np.float32) / 255
    return ((crop - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def infimm_processor(tmp_path_factory):
    """The processor a conversion writes, without a model (prompt tests need no reference)."""
    directory = tmp_path_factory.mktemp("infimm-processor")
    processor = Processor(
        llama_tokenizer(), infimm.image_processor(SIZE), tokens=infimm.TOKENS, **infimm.PROCESSOR_OPTIONS
    )
    processor.save_pretrained(directory)
    return Processor.from_pretrained(directory)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [{"image": picture(0)}, "what is in the picture?"]}],
        [{"role": "user", "content": [{"image": picture(0)}, "and", {"image": picture(1)}, "which is red?"]}],
        [{"role": "user", "content": ["what is in the picture?"]}],
        [
            {"role": "system", "content": "answer briefly."},
            {"role": "user", "content": [{"image": picture(2)}, "why?"]},
        ],
    ],
    ids=["one-image", "two-images", "no-image", "user-system"],
)
def test_prompt_ids_equal_infimms_format(infimm_processor, messages):
    batch = infimm_processor(messages)
    assert batch["input_ids"][0].tolist() == infimm_prompt(infimm_processor.tokenizer, messages)
    images = [
        p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"] if isinstance(p, dict)
    ]
    expected = [infimm_pixels(im) for im in images] or [infimm_pixels(Image.new("RGB", (SIZE, SIZE)))]
    # float32 pixels; 1e-5 absorbs the order of the rescale and normalise operations
    np.testing.assert_allclose(batch["pixel_values"][0].numpy(), np.stack(expected), rtol=0, atol=1e-5)


def test_history_is_written_once_unlike_infimms_processor(infimm_processor):
    """InfiMM's processor appends every non-user turn twice (the second copy as a user
    message); interleaf writes each turn once, as the chat template intends."""
    messages = conversations()[2]
    ours = infimm_processor(messages)["input_ids"][0].tolist()
    tok = infimm_processor.tokenizer
    assert ours == infimm_prompt(tok, messages)
    assert ours != infimm_prompt(tok, messages, duplicate_non_user=True)
    assert tok.decode(ours).count("red.") == 1


def corrupt(infimm_dir, tmp_path, *, drop=(), visual=None, **config):
    """A copy of the tiny checkpoint with tensors dropped or the config changed."""
    src = write_infimm(tmp_path / "bad", infimm_dir.reference, infimm_dir.tower, infimm_dir.tok, **config)
    if drop:
        state = torch.load(src / "pytorch_model.bin")
        torch.save({k: v for k, v in state.items() if not k.startswith(drop)}, src / "pytorch_model.bin")
    if visual:
        data = json.loads((src / "config.json").read_text())
        data["visual"].update(visual)
        (src / "config.json").write_text(json.dumps(data))
    return src


@needs_reference
def test_missing_tensors_are_named_key_by_key(infimm_dir, tmp_path):
    block = "model.lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_q.weight"
    alias = "model.lang_encoder.gated_cross_attn_layers.1.attn.to_q.weight"
    src = corrupt(
        infimm_dir, tmp_path, drop=(block, alias, "model.perceiver.latents", "model.vision_encoder.cls_token")
    )
    with pytest.raises(ValueError) as info:
        infimm.convert(src, tmp_path / "dst")
    message = str(info.value)
    assert "3 missing InfiMM tensor(s)" in message
    for key in (block, "model.perceiver.latents", "model.vision_encoder.cls_token"):
        assert key in message


@needs_reference
@pytest.mark.parametrize(
    "visual, error",
    [
        ({"eva_model_name": "eva-clip-z-99"}, "visual.eva_model_name='eva-clip-z-99' is not a known EVA-CLIP"),
        ({"postnorm": True}, "visual.postnorm=True is not supported: interleaf.s EVA blocks normalise before"),
        ({"window_size": 7}, "visual.window_size is not a field interleaf knows"),
        ({"subln": True, "naiveswiglu": False}, "visual.subln=true with naiveswiglu=false is not supported"),
    ],
    ids=["eva-name", "postnorm", "unknown-field", "subln-gelu"],
)
def test_unsupported_vision_configs_are_refused_in_one_line(infimm_dir, tmp_path, visual, error):
    src = corrupt(infimm_dir, tmp_path, visual=visual)
    with pytest.raises(ValueError, match=error.replace("(", r"\(")) as info:
        infimm.convert(src, tmp_path / "dst")
    assert "\n" not in str(info.value) and "config.json" in str(info.value)


@needs_reference
def test_accepted_visual_fields_that_change_nothing(infimm_dir, tmp_path, converted):
    """xformers attention and fused LayerNorm compute the same function; drop-path is training only."""
    src = corrupt(infimm_dir, tmp_path, visual={"xattn": True, "fusedLN": False, "drop_path_rate": 0.1})
    model = Flamingo.from_pretrained(infimm.convert(src, tmp_path / "dst"))
    assert model.vision.tower.config.to_dict() == converted[0].vision.tower.config.to_dict()


@needs_reference
def test_other_bad_checkpoints(infimm_dir, tmp_path):
    src = corrupt(infimm_dir, tmp_path)
    state = torch.load(src / "pytorch_model.bin")
    alias = "model.lang_encoder.old_decoder_blocks.0.mlp.up_proj.weight"
    state[alias] = state[alias] + 1
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="old_decoder_blocks.0.mlp.up_proj.weight' and its alias hold different"):
        infimm.convert(src, tmp_path / "dst")
    src = corrupt(infimm_dir, tmp_path, image_token_id=5)
    with pytest.raises(ValueError, match="the tokenizer's '<image>' is id .*, but config.json says image_token_id=5"):
        infimm.convert(src, tmp_path / "dst")
    src = corrupt(infimm_dir, tmp_path, cross_attn_every_n_layers=1)
    with pytest.raises(ValueError, match="cross_attn_every_n_layers=1, but the weights have a block every 2"):
        infimm.convert(src, tmp_path / "dst")
    src = corrupt(infimm_dir, tmp_path)
    torch.save({**torch.load(src / "pytorch_model.bin"), "model.mystery": torch.zeros(1)}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unexpected InfiMM parameter 'model.mystery'"):
        infimm.convert(src, tmp_path / "dst")


@needs_reference
def test_convert_verb_and_on_the_fly_loading(infimm_dir, tmp_path, monkeypatch, capsys):
    from interleaf.cli import main

    assert main(["convert", "infimm", str(tmp_path / "nowhere"), str(tmp_path / "dst")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["convert", "infimm", str(infimm_dir.src), str(tmp_path / "dst")]) == 0
    assert Flamingo.from_pretrained(tmp_path / "dst").config.cross_attention.without_media == "skip"

    # a hub id: only the data files are downloaded, converted once into the cache, then reused
    monkeypatch.setenv("INTERLEAF_CACHE", str(tmp_path / "cache"))
    calls = []

    def snapshot(repo, allow_patterns):
        calls.append(repo)
        assert not any(p.endswith(".py") or p == "*" for p in allow_patterns)
        return str(infimm_dir.src)

    monkeypatch.setattr(infimm, "snapshot_download", snapshot)
    model = Flamingo.from_pretrained("Infi-MM/infimm-zephyr")
    processor = Processor.from_pretrained("Infi-MM/infimm-zephyr")
    assert calls == ["Infi-MM/infimm-zephyr"] * 2
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1
    assert processor.chat_bos == "tokenizer" and isinstance(model.vision.tower, EvaVisionModel)
    # a local InfiMM directory loads directly too
    assert isinstance(Flamingo.from_pretrained(infimm_dir.src).vision.tower, EvaVisionModel)


def test_the_tiny_release_round_trips(tmp_path):
    """``write_tiny`` exports an interleaf model in InfiMM's layout (``upstream_name``, to_kv
    from k and v, alias keys); converting it back gives the same model, exactly."""
    src = infimm.write_tiny(tmp_path / "src")
    state = torch.load(src / "pytorch_model.bin")
    assert "model.lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_kv.weight" in state
    assert "model.lang_encoder.gated_cross_attn_layers.1.attn.to_kv.weight" in state
    assert "model.lang_encoder.model.layers.0.decoder_layer.self_attn.q_proj.weight" in state
    model = Flamingo.from_pretrained(infimm.convert(src, tmp_path / "dst"))
    processor = Processor.from_pretrained(tmp_path / "dst")
    original, _ = infimm.tiny_model()
    batch = processor(conversations())
    with torch.no_grad():  # the same weights, inputs and shapes: the same computation, bit for bit
        assert torch.equal(model(**batch).logits, original(**batch).logits)


@pytest.mark.parametrize(
    "content, error",
    [
        (b"", "empty file, not weights"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "a git-lfs pointer, not the weights"),
        (b"this is not a checkpoint\n" * 10, "corrupt"),
        ("list", "holds a list, not a state dict of named tensors"),
    ],
    ids=["empty", "lfs-pointer", "garbage", "not-a-dict"],
)
def test_unreadable_weights_are_one_line_errors(tmp_path, content, error):
    src = infimm.write_tiny(tmp_path / "src")
    if content == "list":
        torch.save([1, 2, 3], src / "pytorch_model.bin")
    else:
        (src / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(ValueError, match=error) as info:
        infimm.convert(src, tmp_path / "dst")
    assert "pytorch_model.bin" in str(info.value) and "weights_only=False" not in str(info.value)


def test_bad_sources_and_a_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    src = infimm.write_tiny(tmp_path / "src")
    good = torch.load(src / "pytorch_model.bin")
    key = "model.lang_encoder.model.embed_tokens.weight"
    torch.save({**good, key: good[key][:-1]}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match=re.escape(f"1 tensor(s) of the wrong shape: {key} (")):
        infimm.convert(src, tmp_path / "dst")
    monkeypatch.setenv("INTERLEAF_CACHE", str(tmp_path / "cache"))
    for _ in range(2):  # the same true error each time: nothing half-written stays behind
        with pytest.raises(ValueError, match="wrong shape"):
            Flamingo.from_pretrained(src)
    assert not list((tmp_path / "cache" / "converted").iterdir())
    torch.save(good, src / "pytorch_model.bin")  # fixed: converts now
    assert isinstance(Flamingo.from_pretrained(src).vision.tower, EvaVisionModel)
    (src / "config.json").write_text((src / "config.json").read_text() + "}{")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        Flamingo.from_pretrained(src)


def test_an_image_written_in_infimms_own_form_is_not_wrapped_twice(infimm_processor):
    image = picture(0)
    ours = infimm_processor("<image>what is it?", images=[image])["input_ids"]
    theirs = infimm_processor("<|endofchunk|><image>what is it?", images=[image])["input_ids"]
    assert torch.equal(ours, theirs)
    assert (ours == infimm_processor.ids.end_of_chunk).sum() == 1
