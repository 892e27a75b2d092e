"""interleaf's EVA-CLIP tower against timm's ``Eva``, the ecosystem's reference implementation
of EVA02 (timm maps EVA-CLIP's own state dicts into it with ``checkpoint_filter_fn``, the path
by which it loads the released EVA02-CLIP weights); see ``evahelp`` for how timm is imported.
"""

from unittest import mock

import pytest
import torch
import transformers

from interleaf import Flamingo
from interleaf.config import VisionConfig
from interleaf.model.checkpoint import load_lm_and_tokenizer
from interleaf.model.eva import EvaVisionConfig, EvaVisionModel, from_eva_clip_state_dict

from conftest import TEXTS, encode, open_gates, tiny_config
from evahelp import eva_clip_names, needs_timm, reference


def random_tower(**overrides) -> EvaVisionModel:
    config = dict(image_size=24, patch_size=4, width=32, layers=2, head_width=8, mlp_ratio=2.6667)
    torch.manual_seed(0)
    tower = EvaVisionModel(EvaVisionConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        for p in tower.parameters():  # random everything, LayerNorms and biases included
            p.normal_(0, 0.3)
    return tower


@needs_timm
@pytest.mark.parametrize(
    "overrides",
    [
        {},  # EVA02-CLIP-L/14-336's recipe: rope with interpolated frequencies, SwiGLU, sub-LN, q/v bias
        {"image_size": (24, 32)},  # a non-square patch grid (6 x 8)
        {"subln": False, "swiglu": False},  # fused qkv, GELU MLP
        {"layer_scale": 0.1, "qkv_bias": False},
        {"intp_freq": False, "pt_hw_seq_len": 6},  # frequencies of the grid itself
        {"rope": False},
    ],
    ids=["eva02-clip", "non-square", "gelu-fused-qkv", "layerscale-no-bias", "no-intp", "no-rope"],
)
def test_features_match_timm(overrides):
    tower = random_tower(**overrides)
    ref = reference(tower)
    pixels = torch.randn(3, 3, *(g * tower.config.patch_size for g in tower.config.grid_size))
    ours_last, ref_last = [], []
    hooks = [
        tower.encoder.layers[-1].register_forward_hook(lambda m, i, o: ours_last.append(o)),
        ref.blocks[-1].register_forward_hook(lambda m, i, o: ref_last.append(o)),
    ]
    with torch.no_grad():
        ours, theirs = tower(pixels), ref.forward_features(pixels)
    for h in hooks:
        h.remove()
    # float32, same operations in the same order on both sides; 1e-5 absorbs a different
    # kernel choice on another CPU
    torch.testing.assert_close(ours_last[0], ref_last[0], rtol=0, atol=1e-5)  # all tokens, before the norm
    torch.testing.assert_close(ours.pooler_output, theirs[:, 0], rtol=0, atol=1e-5)  # the class token
    torch.testing.assert_close(ours.last_hidden_state, theirs, rtol=0, atol=1e-5)


@needs_timm
def test_the_comparison_sees_a_wrong_rotation():
    """The parity above is not vacuous: rotating halves (GPT-NeoX style) instead of EVA's
    interleaved pairs changes the features far beyond the tolerance."""
    tower = random_tower()
    ref = reference(tower)
    pixels = torch.randn(2, 3, 24, 24)
    halves = lambda x: torch.cat([-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]], -1)  # noqa: E731
    with mock.patch("interleaf.model.eva._rotate_pairs", halves), torch.no_grad():
        wrong = tower(pixels).last_hidden_state
    assert (wrong - ref.forward_features(pixels)).abs().max() > 1e-2


def test_eva_clip_state_dict_loads_by_name():
    tower = random_tower()
    state = from_eva_clip_state_dict(
        {f"model.vision_encoder.{k}": v for k, v in eva_clip_names(tower).items()}, "model.vision_encoder."
    )
    fresh = EvaVisionModel(tower.config)
    assert fresh.load_state_dict(state, strict=True)
    pixels = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(pixels).last_hidden_state, tower(pixels).last_hidden_state)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="width 30 is not a multiple of head_width 8"):
        EvaVisionConfig(width=30, head_width=8)
    with pytest.raises(
        ValueError, match="without intp_freq are defined on a 16x16 patch grid; this tower's grid is 6x6"
    ):
        EvaVisionModel(EvaVisionConfig(image_size=24, patch_size=4, width=32, layers=1, head_width=8, intp_freq=False))
    with pytest.raises(ValueError, match=r"takes 24x24 images, got \(32, 32\)"):
        random_tower()(torch.randn(1, 3, 32, 32))


def test_an_eva_tower_in_a_flamingo_saves_and_loads(backbones, tmp_path):
    """In a Flamingo, reading InfiMM's features (the last block, before the norm, the class
    token kept); the checkpoint's vision_config.json brings the tower back."""
    tower = random_tower(image_size=32, patch_size=8)
    lm, tok = load_lm_and_tokenizer(backbones("lm", "llama"))
    config = tiny_config(backbones, vision=VisionConfig(source="", layer=-1, post_layernorm=False, drop_cls=False))
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model = Flamingo(config, lm=lm, vision_tower=tower, tokenizer=tok, image_processor=processor).eval()
    open_gates(model)
    ids, mask, pixels = encode(model, TEXTS)
    assert model.vision(pixels[:, 0]).shape == (3, 17, 32)  # 16 patches and the class token
    with torch.no_grad():
        logits = model(ids, mask, pixels).logits
    model.save_pretrained(tmp_path / "eva-flamingo")
    loaded = Flamingo.from_pretrained(tmp_path / "eva-flamingo")
    assert isinstance(loaded.vision.tower, EvaVisionModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, pixels).logits, logits, rtol=0, atol=0)
