import dataclasses

import pytest
import torch
import transformers

from interleaf import Flamingo
from interleaf.config import CrossAttentionConfig, LMConfig, ResamplerConfig, TrainableConfig, VisionConfig
from interleaf.model.masks import flamingo_labels, position_ids
from interleaf.tiny import LM_FAMILIES, build_lm, build_tokenizer

from conftest import TEXTS, encode, open_gates, tiny_config


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_zero_gates_equal_the_bare_lm(make_model, backbones, family):
    model = make_model(family, gates=False)
    ids, mask, pixels = encode(model, TEXTS, padding_side="right")
    ours = model(ids, mask, pixels).logits
    bare = transformers.AutoModelForCausalLM.from_pretrained(backbones("lm", family)).eval()
    kwargs = dict(inputs_embeds=model.language_model.embed(ids), attention_mask=mask)
    if model.language_model._takes_position_ids:
        kwargs["position_ids"] = position_ids(mask)
    with torch.no_grad():
        ref = bare(**kwargs).logits
    start = model.language_model.new_token_start
    real = mask.bool()
    assert ours.shape[-1] == len(model.tokenizer)
    assert (ours[..., :start][real] - ref[..., :start][real]).abs().max() <= 1e-6
    # and on plain text, token ids straight into the bare LM
    text = model.tokenizer(["a small green square at the top left"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert (model(text).logits[..., :start] - bare(input_ids=text).logits[..., :start]).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["last", "all"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_image_only_changes_logits_after_it(make_model, family, mode):
    model = make_model(family, cross_attention=CrossAttentionConfig(heads=2, head_dim=8, media_attention=mode))
    text = "a cat <image> sits on the grass <image> and sleeps now"
    ids, mask, pixels = encode(model, [text, "a much longer prompt that pads the first one on the left"])
    ids, mask, pixels = ids[:1], mask[:1], pixels[:1]  # a left-padded row
    assert mask[0, 0] == 0
    first, second = (ids[0] == model.ids.image).nonzero()[:, 0].tolist()
    base = model(ids, mask, pixels).logits
    for k, pos in ((0, first), (1, second)):
        changed = pixels.clone()
        changed[0, k] = torch.randn_like(changed[0, k])
        out = model(ids, mask, changed).logits
        assert torch.equal(out[0, :pos], base[0, :pos]), f"image {k} leaked before its position"
        assert (out[0, pos:] - base[0, pos:]).abs().max() > 1e-4


def test_padding_images_never_reach_the_vision_encoder(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS, images_per_sample=3)
    reference = model(ids, mask, pixels).logits
    calls = []
    handle = model.vision.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    poisoned = pixels.clone()
    counts = (ids == model.ids.image).sum(-1)
    for b, n in enumerate(counts.tolist()):
        poisoned[b, n:] = float("nan")
    out = model(ids, mask, poisoned).logits
    handle.remove()
    assert torch.equal(out, reference)
    assert calls == [int(counts.sum())]


def test_on_a_cpu_the_tower_takes_a_few_images_at_a_time(make_model, monkeypatch):
    """VisionEncoder.cpu_chunk: the images go through the tower in chunks whose hidden state fits
    CPU_CHUNK_FLOATS; each image's features are its own (a chunk of another size may round its
    matmuls differently: float32 rounding, features of size ~1)."""
    import interleaf.model.vision as vision

    model = make_model()
    pixels = torch.randn(7, 3, 32, 32)
    whole = model.vision(pixels)
    per_image = (model.vision.num_tokens + 1) * model.vision.dim
    monkeypatch.setattr(vision, "CPU_CHUNK_FLOATS", 3 * per_image)  # 3 images per tower call
    sizes = []
    handle = model.vision.tower.register_forward_hook(lambda m, i, o: sizes.append(o[0].shape[0]))
    chunked = model.vision(pixels)
    handle.remove()
    assert sizes == [3, 3, 1] and model.vision.cpu_chunk(pixels) == 3
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked[:3], model.vision(pixels[:3]))  # the same computation: the same bits
    # the model's encoding: tower and resampler chunk by chunk, each sample's latents in place
    ids, mask, batch_pixels = encode(model, TEXTS, images_per_sample=3)
    monkeypatch.setattr(vision, "CPU_CHUNK_FLOATS", 2 * per_image)
    resampled = []
    handle = model.resampler.register_forward_hook(lambda m, i, o: resampled.append(o.shape[0]))
    chunked = model.encode_images(ids, batch_pixels)
    monkeypatch.setattr(vision, "CPU_CHUNK_FLOATS", 1 << 30)
    torch.testing.assert_close(chunked, model.encode_images(ids, batch_pixels), rtol=1e-5, atol=1e-5)
    handle.remove()
    assert resampled == [2, 1, 3]  # 3 real images in chunks of 2, then all at once
    monkeypatch.setattr(vision, "CPU_CHUNK_FLOATS", 1)
    assert model.vision.cpu_chunk(pixels) == 1  # never zero images per call


def test_a_sample_alone_equals_it_in_a_batch(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    batched = model(ids, mask, pixels).logits
    for i, text in enumerate(TEXTS):
        one_ids, one_mask, _ = encode(model, [text])
        n = int((one_ids == model.ids.image).sum())
        alone = model(one_ids, one_mask, pixels[i : i + 1, : max(n, 1)]).logits
        real = mask[i].bool()
        assert torch.allclose(batched[i, real], alone[0], atol=1e-5)


def test_text_only_and_bad_pixel_values(make_model):
    model = make_model()
    ids, mask, _ = encode(model, ["only text"])
    assert model(ids, mask).logits.shape[:2] == ids.shape
    ids, mask, pixels = encode(model, TEXTS[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids, mask)
    with pytest.raises(ValueError, match="sample 0 has 2 <image> tokens but pixel_values hold 1 image slots"):
        model(ids, mask, pixels[:, :1])
    with pytest.raises(ValueError, match="pixel_values hold 2 samples for 1 samples in input_ids"):
        model(ids, mask, pixels.expand(2, -1, -1, -1, -1))
    with pytest.raises(ValueError, match=r"must be \(B, N, C, H, W\)"):
        model(ids, mask, pixels[0])


def test_video_frames_and_no_resampler(make_model):
    model = make_model(resampler=ResamplerConfig(depth=1, num_latents=4, heads=2, head_dim=8, max_frames=3))
    ids, mask, pixels = encode(model, TEXTS[1:2])
    frames = torch.randn(1, 1, 3, 3, 32, 32)
    logits = model(ids, mask, frames).logits
    assert not torch.allclose(logits, model(ids, mask, frames.flip(2)).logits)
    direct = make_model(resampler=ResamplerConfig(enabled=False))
    assert direct.resampler is None
    out = direct(ids, mask, pixels).logits
    assert (direct(ids, mask, torch.randn_like(pixels)).logits - out).abs().max() > 1e-4


def test_cross_attention_placement(make_model):
    def placed(**kw):
        model = make_model(gates=False, cross_attention=CrossAttentionConfig(heads=2, head_dim=8, **kw))
        layers = model.language_model.lm.get_submodule(model.language_model.layers_path)
        return [i for i, layer in enumerate(layers) if hasattr(layer, "xattn")]

    assert placed(interval=1) == [0, 1, 2, 3]
    assert placed(interval=2, offset=1) == [1, 3]  # OpenFlamingo: every n-th, counting from 1
    assert placed(interval=2) == [0, 2]  # IDEFICS
    with pytest.raises(ValueError, match="selects none"):
        placed(interval=8, offset=5)


def test_layers_path(make_model, backbones):
    model = make_model("gpt2", gates=False, lm=LMConfig(source=backbones("lm", "gpt2"), layers_path="transformer.h"))
    assert model.language_model.layers_path == "transformer.h"
    with pytest.raises(ValueError, match="'transformer.nope' does not exist"):
        make_model("gpt2", lm=LMConfig(source=backbones("lm", "gpt2"), layers_path="transformer.nope"))


def test_vision_variants(make_model, backbones):
    for vision in (
        VisionConfig(source=backbones("vision", "siglip"), post_layernorm=True),
        VisionConfig(source=backbones("vision", "clip"), layer=-2, drop_cls=True),
    ):
        model = make_model(vision=vision)
        features = model.vision(torch.randn(2, 3, 32, 32))
        patches = 16 if (vision.drop_cls or "siglip" in vision.source) else 17
        assert features.shape == (2, patches, 32)
    with pytest.raises(ValueError, match="vision.layer=5 is out of range"):
        make_model(vision=VisionConfig(source=backbones("vision", "clip"), layer=5))


def test_idefics_vision_tower_layout(backbones):
    from transformers.models.idefics.vision import IdeficsVisionConfig, IdeficsVisionTransformer

    from interleaf.model.checkpoint import load_lm_and_tokenizer

    tower = IdeficsVisionTransformer(
        IdeficsVisionConfig(
            embed_dim=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
    )
    lm, tok = load_lm_and_tokenizer(backbones("lm", "llama"))
    model = Flamingo(tiny_config(backbones), lm=lm, vision_tower=tower, tokenizer=tok).eval()
    open_gates(model)
    ids, mask, pixels = encode(model, TEXTS)
    assert model.vision(pixels[:, 0]).shape == (3, 17, 32)
    assert torch.isfinite(model(ids, mask, pixels).logits).all()


def test_trainable_policy(make_model, backbones):
    model = make_model()
    names = model.trainable_names
    assert names and all(n.startswith(("resampler.", "language_model.extra_")) or ".xattn." in n for n in names)
    assert any(n.startswith("resampler.") for n in names) and any(".xattn." in n for n in names)
    assert "language_model.extra_embed.weight" in names and "language_model.extra_head.weight" in names
    assert not any(p.requires_grad for p in model.vision.parameters())
    lm = model.language_model.lm
    frozen = [p for n, p in lm.named_parameters() if ".xattn." not in n]
    assert not any(p.requires_grad for p in frozen)
    assert model.num_trainable_parameters() == sum(p.numel() for n, p in model.named_parameters() if n in names)

    resized = make_model(lm=LMConfig(source=backbones("lm", "llama"), new_token_embeddings="resize"))
    assert resized.language_model.extra_embed is None
    emb = resized.language_model.lm.get_input_embeddings().weight
    assert emb.shape[0] == len(resized.tokenizer) and emb.requires_grad

    everything = make_model(trainable=TrainableConfig(lm=True, vision=True))
    assert all(p.requires_grad for p in everything.parameters())

    with pytest.raises(ValueError, match=r"lm_patterns: 'model.layers.0.self_attn.\*' matches no LM parameter"):
        make_model(trainable=TrainableConfig(lm_patterns=("model.layers.0.self_attn.*",)))
    some = make_model(trainable=TrainableConfig(lm_patterns=("model.norm.*",)))
    lm_names = {n for n in some.trainable_names if n.startswith("language_model.lm.") and ".xattn." not in n}
    assert lm_names == {"language_model.lm.model.norm.weight"}


def test_overfits_a_few_interleaved_examples_moving_only_trainable_parameters(make_model, tmp_path):
    # A random LM with the usual 0.02 init has logits too flat to fit anything; 0.3 stands in
    # for a pretrained LM whose head can express confident predictions.
    lm_dir = build_lm(tmp_path / "lm", "llama", tokenizer=build_tokenizer(), initializer_range=0.3)
    model = make_model("llama", gates=False, lm=LMConfig(source=str(lm_dir))).train()
    ids, mask, pixels = encode(model, TEXTS, seed=1)
    labels = flamingo_labels(ids, mask, image_token_id=model.ids.image, end_of_chunk_id=model.ids.end_of_chunk)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = model(ids, mask, pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    moved = [n for n, p in trainable.items() if not torch.equal(after[n], p)]
    assert any(".attn_gate" in n for n in moved) and any(n.startswith("resampler.") for n in moved)


def test_z_loss_adds_to_the_loss(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    labels = flamingo_labels(ids, mask, image_token_id=model.ids.image, end_of_chunk_id=model.ids.end_of_chunk)
    plain = model(ids, mask, pixels, labels=labels)
    with_z = model(ids, mask, pixels, labels=labels, z_loss_weight=1e-3)
    logits = plain.logits[:, :-1]
    valid = labels[:, 1:] != -100
    expected = plain.loss + 1e-3 * torch.logsumexp(logits[valid], -1).pow(2).mean()
    assert torch.allclose(with_z.loss, expected)


def test_empty_supervision_gives_zero_loss_not_nan(make_model):
    model = make_model()
    ids, mask, _ = encode(model, ["text only, nothing to learn"])
    labels = torch.full_like(ids, -100)
    out = model(ids, mask, labels=labels, z_loss_weight=1e-3)
    assert out.loss.item() == 0.0


def test_bfloat16_build_forward_and_generate(make_model, backbones):
    model = Flamingo.from_config(tiny_config(backbones), dtype=torch.bfloat16)
    open_gates(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, mask, pixels = encode(model, TEXTS)
    assert model(ids, mask, pixels).logits.dtype == torch.bfloat16
    assert model.generate(ids, mask, pixels, max_new_tokens=3).shape == (3, 3)


def test_lm_with_more_embedding_rows_than_tokens(make_model, tmp_path):
    # Qwen2, OPT and Pythia pad their embedding matrices beyond the tokenizer's length
    tok = build_tokenizer()
    lm_dir = build_lm(tmp_path / "lm", "qwen2", tokenizer=tok, vocab_size=len(tok) + 17)
    model = make_model("qwen2", gates=False, lm=LMConfig(source=str(lm_dir)))
    start = model.language_model.new_token_start
    assert start == len(tok) and model.language_model.extra_embed.num_embeddings == 3
    ids, mask, pixels = encode(model, TEXTS)
    logits = model(ids, mask, pixels).logits
    assert logits.shape[-1] == len(model.tokenizer)
    bare = transformers.AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    text = model.tokenizer(["a small green square"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(text).logits[..., :start], bare(input_ids=text).logits[..., :start], atol=1e-6)


def test_without_media_skip_leaves_text_only_samples_to_the_lm(make_model, backbones):
    """InfiMM's rule (CrossAttentionConfig.without_media="skip"): a sample with no image at all
    goes through no part of the cross-attention blocks, its feed-forward included, so with open
    gates it reads exactly as the bare LM; a sample with an image is changed everywhere, its
    text before the image too (the feed-forward applies to it), as with the default "ff"."""
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    with torch.no_grad():
        fed = model(ids, mask, pixels).logits  # the default rule, "ff"
        skip = dataclasses.replace(model.config.cross_attention, without_media="skip")
        model.config = dataclasses.replace(model.config, cross_attention=skip)
        skipped = model(ids, mask, pixels).logits
        gates = {name: p.clone() for name, p in model.named_parameters() if name.endswith("_gate")}
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.zero_()
        bare = model(ids, mask, pixels).logits  # closed gates: the LM itself
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.copy_(gates[name])
    text_only = 2  # TEXTS[2] has no image
    real = mask[text_only].bool()
    # exact: the same batch through the same LM; "skip" hands each block's input on unchanged and
    # closed gates add tanh(0) * f = 0, so both rows are the LM's own output, bit for bit
    assert torch.equal(skipped[text_only][real], bare[text_only][real])
    assert (fed[text_only][real] - bare[text_only][real]).abs().max() > 1e-3  # "ff" changes it
    for row in (0, 1):  # samples with images: the two rules agree
        torch.testing.assert_close(skipped[row][mask[row].bool()], fed[row][mask[row].bool()], rtol=0, atol=0)
    # each row as it is alone, and cached generation as recomputation
    with torch.no_grad():
        one = model(ids[text_only : text_only + 1], mask[text_only : text_only + 1], pixels[text_only : text_only + 1])
    # alone vs in a padded batch: other shapes, so rounding (~1e-6) may differ
    torch.testing.assert_close(one.logits[0][real], skipped[text_only][real], rtol=0, atol=1e-5)
    no_stop = dict(stop_at_eos=False, stop_at_end_of_chunk=False)
    cached = model.generate(ids, mask, pixels, max_new_tokens=5, **no_stop)
    assert torch.equal(cached, model.generate(ids, mask, pixels, max_new_tokens=5, use_cache=False, **no_stop))
    expected = r"CrossAttentionConfig.without_media: expected one of \['ff', 'skip'\], got 'never'"
    with pytest.raises(ValueError, match=expected):
        CrossAttentionConfig(without_media="never")
