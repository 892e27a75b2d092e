"""A tokenizer whose pad token is its EOS, a model that resets images at EOS (packed
documents), right padding: the generated tokens still see the prompt's images."""

import dataclasses

import torch

from interleaf import Flamingo
from interleaf.config import LMConfig
from interleaf.tiny import build_lm, build_tokenizer

from conftest import encode, open_gates, tiny_config


def test_right_padding_with_pad_equal_to_eos_keeps_the_images(backbones, tmp_path):
    build_lm(tmp_path / "lm", "llama", tokenizer=build_tokenizer(pad_token="</s>"))
    config = tiny_config(backbones, lm=LMConfig(source=str(tmp_path / "lm")))
    config = dataclasses.replace(config, cross_attention=dataclasses.replace(config.cross_attention, reset_at_eos=True))
    torch.manual_seed(0)
    model = Flamingo.from_config(config)
    open_gates(model)
    assert model.ids.pad == model.ids.eos
    texts = ["<image>a photo of a red circle and a long tail of words", "<image>a cat"]
    ids, mask, pixels = encode(model, texts, padding_side="right")
    assert ids[1, -1] == model.ids.eos and mask[1, -1] == 0

    media = model.prepare_media(ids, pixels)
    history = torch.cat([ids, torch.full((2, 1), 5)], dim=1)
    attention = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    visible = model.visible_media(history, attention, media, 1)
    assert visible[:, 0, 0].tolist() == [True, True]  # the padded row's new token sees its image

    padded = model.generate(ids, mask, pixels, max_new_tokens=4, stop_at_eos=False)
    alone_ids, alone_mask, _ = encode(model, texts[1:], padding_side="right")
    alone = model.generate(alone_ids, alone_mask, pixels[1:], max_new_tokens=4, stop_at_eos=False)
    # argmax tokens of two batch shapes: robust to last-bit differences between them
    assert padded[1].tolist() == alone[0].tolist()
