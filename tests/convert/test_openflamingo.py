"""Parity with open-flamingo 2.0.1's own model code on tiny random models.

open-flamingo pins torch 2.0.1, so it is installed without its dependencies and only its
model code is used; its package __init__ imports open_clip for the factory, which these
tests never call, so a stand-in module satisfies that import. The vision encoder on both
sides is the same Hugging Face CLIP tower: OpenFlamingo reads open_clip's patch tokens (last
layer, no final LayerNorm, no class token), which is what ``visual`` below returns.
"""

import sys
import types

import pytest
import torch
import transformers
from torch import nn

from interleaf import Flamingo, Processor
from interleaf.convert.openflamingo import convert
from interleaf.tiny import build_lm, build_tokenizer, build_vision

sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))
of_flamingo = pytest.importorskip("open_flamingo.src.flamingo")
of_lm = pytest.importorskip("open_flamingo.src.flamingo_lm")
of_utils = pytest.importorskip("open_flamingo.src.utils")

LAYERS_ATTR = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers", "mpt": "transformer.blocks"}


class OpenClipStandIn(nn.Module):
    """``vision_encoder.visual`` with open_clip's output_tokens contract: (pooled, patch tokens)."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixels):
        hidden = self.tower(pixel_values=pixels).last_hidden_state
        return hidden[:, 0], hidden[:, 1:]


def build_reference(tmp_path, family, interval):
    base_tok = build_tokenizer()
    lm_dir = build_lm(tmp_path / "lm", family, tokenizer=base_tok, hidden=64, heads=4, layers=4)
    vision_dir = build_vision(tmp_path / "vision", "clip", hidden=48)
    tok = transformers.AutoTokenizer.from_pretrained(lm_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    lang = transformers.AutoModelForCausalLM.from_pretrained(lm_dir)
    of_utils.extend_instance(lang, of_lm.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name(LAYERS_ATTR[family])
    lang.resize_token_embeddings(len(tok))
    vision = types.SimpleNamespace(visual=OpenClipStandIn(transformers.CLIPVisionModel.from_pretrained(vision_dir)))
    torch.manual_seed(1)
    model = of_flamingo.Flamingo(
        vision,
        lang,
        tok.convert_tokens_to_ids("<|endofchunk|>"),
        tok.convert_tokens_to_ids("<image>"),
        vis_dim=48,
        cross_attn_every_n_layers=interval,
    ).eval()
    with torch.no_grad():  # open gates; train-like embeddings for the new tokens
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.copy_(torch.randn_like(param))
        emb = model.lang_encoder.get_input_embeddings().weight
        emb[len(base_tok) :] = torch.randn_like(emb[len(base_tok) :]) * 0.5
    # what OpenFlamingo trains (create_model_and_transforms) and saves (get_checkpoint: the
    # state dict less the frozen parameters, so aliases such as the FlamingoLayer copies stay)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    state = model.state_dict()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            del state[name]
    torch.save(state, tmp_path / "checkpoint.pt")
    return model, tok, lm_dir, vision_dir


TEXTS = [
    "<image>Output: a cat.<|endofchunk|><image>Output: a dog",
    "A text-only prompt, padded",
    "<image>Question: what is it? Short answer:",
]


def batch_for(processor, seed=0):
    """OpenFlamingo's evaluation prompts, as text with placeholders and separate images."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    images = [
        [Image.fromarray((torch.rand(36, 40, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]
        for n in (2, 0, 1)
    ]
    return processor(TEXTS, images=images)


@pytest.mark.parametrize("family, interval", [("llama", 2), ("gpt_neox", 1), ("mpt", 4)])
def test_logits_equal_open_flamingo(tmp_path, family, interval):
    reference, tok, lm_dir, vision_dir = build_reference(tmp_path, family, interval)
    convert(tmp_path / "checkpoint.pt", tmp_path / "dst", lm=str(lm_dir), vision=str(vision_dir))
    model = Flamingo.from_pretrained(tmp_path / "dst")
    processor = Processor.from_pretrained(tmp_path / "dst")
    assert model.config.cross_attention.interval == interval
    batch = batch_for(processor)
    # the token ids OpenFlamingo's own evaluation would feed (its tokenizer, left padding)
    tok.padding_side = "left"
    upstream = tok(TEXTS, padding="longest", return_tensors="pt")
    assert torch.equal(batch["input_ids"], upstream["input_ids"])
    assert torch.equal(batch["attention_mask"], upstream["attention_mask"])
    with torch.no_grad():
        ours = model(**batch).logits
        pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        theirs = reference(vision_x=pixels[:, :, None], lang_x=ids, attention_mask=mask).logits
    real = batch["attention_mask"].bool()
    # OpenFlamingo never trains nor releases an untied output matrix (Llama's lm_head,
    # GPT-NeoX's embed_out): the reference's new rows there are random, so only the base
    # vocabulary compares; with tied embeddings (MPT) every column does.
    cols = ours.shape[-1] if family == "mpt" else len(build_tokenizer())
    diff = (ours[..., :cols] - theirs[..., :cols])[real].abs().max().item()
    assert diff <= 1e-4, diff
    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    with torch.no_grad():
        assert (model(**other).logits - ours)[real].abs().max() > 1e-2  # the images matter


def test_conversion_errors(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt: cannot read an OpenFlamingo checkpoint"):
        convert(tmp_path / "checkpoint.pt", tmp_path / "dst", lm="unused")
    _, _, lm_dir, vision_dir = build_reference(tmp_path, "llama", 2)
    sources = dict(lm=str(lm_dir), vision=str(vision_dir))
    with pytest.raises(ValueError, match="cross_attn_every_n_layers=1, but the checkpoint has a block every 2"):
        convert(tmp_path / "checkpoint.pt", tmp_path / "dst", cross_attn_every_n_layers=1, **sources)
    state = torch.load(tmp_path / "checkpoint.pt")
    state["perceiver.mystery"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unexpected OpenFlamingo parameter 'perceiver.mystery'"):
        convert(tmp_path / "bad.pt", tmp_path / "dst", **sources)


def test_convert_verb(tmp_path, capsys):
    from interleaf.cli import main

    _, _, lm_dir, vision_dir = build_reference(tmp_path, "gpt_neox", 1)
    args = ["convert", "openflamingo", str(tmp_path / "checkpoint.pt"), str(tmp_path / "dst")]
    assert main(args) == 2 and "needs --lm" in capsys.readouterr().err
    assert main([*args, "--lm", str(lm_dir), "--vision", str(vision_dir)]) == 0
    assert Flamingo.from_pretrained(tmp_path / "dst").config.lm.new_token_embeddings == "resize"


def test_known_release_ids_convert_on_the_fly(tmp_path, monkeypatch):
    from interleaf.convert import openflamingo

    _, _, lm_dir, vision_dir = build_reference(tmp_path, "gpt_neox", 1)
    repo = "openflamingo/OpenFlamingo-4B-vitl-rpj3b"
    monkeypatch.setenv("INTERLEAF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(openflamingo.RELEASES, repo, (str(lm_dir), 1))
    monkeypatch.setattr(openflamingo, "VISION", str(vision_dir))
    calls = []
    monkeypatch.setattr(
        openflamingo, "hf_hub_download", lambda r, f: calls.append((r, f)) or str(tmp_path / "checkpoint.pt")
    )
    model = Flamingo.from_pretrained(repo)
    Processor.from_pretrained(repo)
    assert calls == [(repo, "checkpoint.pt")]  # downloaded and converted once
    assert model.config.lm.source == str(lm_dir)
