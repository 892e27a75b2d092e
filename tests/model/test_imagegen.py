"""The image generation head (MM-Interleaved): targets, losses, conditioning, sampling, saving,
and that a text-only model is untouched by it."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from interleaf import Flamingo, Processor
from interleaf.config import FlamingoConfig, ImageGenerationConfig, UNetConfig
from interleaf.data import tinyworld
from interleaf.data.collate import CollateConfig, Collator
from interleaf.model.imagegen import AlignedMedia, DecoupledMedia, Targets, find_targets
from interleaf.train.checkpoints import init_weights

from conftest import encode, open_gates, tiny_config
from drawhelp import draw_config

BOI = tinyworld.BEGIN_OF_IMAGE


@pytest.fixture
def drawer(backbones):
    def make(**gen):
        torch.manual_seed(0)
        model = Flamingo.from_config(draw_config(backbones, **gen))
        open_gates(model)
        return model, Processor(model.tokenizer, model.image_processor, tokens=model.config.tokens)

    return make


def story_batch(processor, n=4, seed=0):
    docs = list(tinyworld.iter_train_documents(seed, n, mix={"story": 0.5, "variation": 0.5}))
    return Collator(processor, CollateConfig(max_tokens=128, max_images=4))(docs)


def test_targets_are_the_images_announced_by_the_begin_of_image_token():
    image, boi = 9, 7
    ids = torch.tensor([[1, 5, boi, image, 5, image, 5, boi, image], [0, 0, image, 5, 5, boi, image, 5, 5]])
    t = find_targets(ids, image, boi)
    assert t.sample.tolist() == [0, 0, 1]
    assert t.image.tolist() == [0, 2, 1]  # the un-announced image 1 of row 0 is read, not drawn
    assert t.position.tolist() == [2, 7, 5]
    assert len(find_targets(ids[:, :2], image, boi)) == 0


def test_config_needs_the_token_and_a_vae_for_latents(backbones):
    base = tiny_config(backbones)
    with pytest.raises(ValueError, match="tokens.begin_of_image"):
        dataclasses.replace(base, image_generation=ImageGenerationConfig())
    with pytest.raises(ValueError, match="needs vae"):
        ImageGenerationConfig(space="latent")
    with pytest.raises(ValueError, match="condition_dropout"):
        ImageGenerationConfig(condition_dropout=1.0)
    with pytest.raises(ValueError, match="image_generation.unet.block_out_channels"):
        FlamingoConfig.from_dict(
            {"tokens": {"begin_of_image": BOI}, "image_generation": {"unet": {"block_out_channels": "x"}}}
        )
    with pytest.raises(ValueError, match="unknown key 'steps'"):
        FlamingoConfig.from_dict({"tokens": {"begin_of_image": BOI}, "image_generation": {"steps": 3}})


def test_the_begin_of_image_token_is_added_last(drawer, backbones):
    model, processor = drawer()
    text_only = Flamingo.from_config(tiny_config(backbones))
    assert model.ids.begin_of_image == len(model.tokenizer) - 1
    assert len(model.tokenizer) == len(text_only.tokenizer) + 1
    for name in ("image", "end_of_chunk", "pad", "eos"):
        assert getattr(model.ids, name) == getattr(text_only.ids, name)
    assert processor.ids.begin_of_image == model.ids.begin_of_image


def test_story_documents_teach_all_their_text_and_draw_their_images(drawer):
    model, processor = drawer()
    batch = story_batch(processor)
    ids, labels = batch["input_ids"], batch["labels"]
    boi, image = model.ids.begin_of_image, model.ids.image
    announced = find_targets(ids, image, boi)
    assert len(announced) >= 4
    assert (labels[ids == image] == -100).all()
    assert (labels[ids == boi] == boi).all()  # the model learns to announce an image
    assert not (ids == model.ids.end_of_chunk).any()
    real = batch["attention_mask"].bool() & (ids != image)
    first = real.long().argmax(-1)  # the BOS of each row is context; every later real token is learned
    for b in range(ids.shape[0]):
        row = real[b].clone()
        row[first[b]] = False
        assert (labels[b][row] != -100).all()


def test_the_training_loss_adds_the_weighted_diffusion_loss_and_trains_the_head(drawer):
    model, processor = drawer(loss_weight=10.0)
    model.train()
    batch = story_batch(processor)
    out = model(**batch)
    assert out.image_loss is not None and out.image_loss > 0
    assert torch.allclose(out.loss, out.text_loss + 10.0 * out.image_loss)
    out.loss.backward()
    gen = model.image_generator
    for name, param in [
        ("unet", gen.unet.conv_in.weight),
        ("condition queries", gen.conditions.queries),
        ("mmfs projection", gen.media_proj.weight),
        ("resampler", model.resampler.latents),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # a batch that announces no image has the text loss alone
    ids, mask, pixels = encode(model, ["<image>two green squares"])
    plain = model(ids, mask, pixels, labels=ids)
    assert plain.image_loss is None and torch.equal(plain.loss, plain.text_loss)  # one tensor, nothing added


def test_the_condition_reads_the_states_up_to_its_token_and_mmfs_only_earlier_images(drawer):
    model, _ = drawer(token_context=0)  # the Perceiver and MMFS alone (the tokens: below)
    gen = model.image_generator
    states = torch.randn(2, 6, gen.conditions.proj.in_features)
    mask = torch.ones(2, 6, dtype=torch.long)
    media = torch.randn(2, 3, 4, model.vision.dim)  # 3 image slots of 4 latents
    targets = Targets(sample=torch.tensor([0, 1]), image=torch.tensor([0, 2]), position=torch.tensor([2, 4]))
    context, keep = gen.context(states, mask, media, targets)
    q = gen.cfg.num_conditions
    assert context.shape == (2, q + 3 * 4, gen.cfg.condition_dim)
    assert keep[0, q:].sum() == 0 and keep[1, q:].tolist() == [True] * 8 + [False] * 4
    with torch.no_grad():
        later = states.clone()
        later[0, 3:] = torch.randn_like(later[0, 3:])  # after target 0's token
        later_media = media.clone()
        later_media[1, 2] = torch.randn_like(later_media[1, 2])  # target 1's own slot
        again, _ = gen.context(later, mask, later_media, targets)
        earlier = states.clone()
        earlier[0, 1] += torch.randn_like(earlier[0, 1])
        moved, _ = gen.context(earlier, mask, media, targets)
    # what may be read is the same, and masked keys weigh exactly 0: the same numbers
    assert torch.equal(again[keep], context[keep])
    assert (moved[0, :q] - context[0, :q]).abs().max() > 1e-4
    null, null_keep = gen.null_context(context, keep)
    assert null_keep[:, q:].sum() == 0 and torch.equal(null[0, 0], gen.null_condition[0].detach())


def test_without_mmfs_the_decoder_reads_the_condition_only(drawer):
    model, _ = drawer(mmfs=False, token_context=0)
    gen = model.image_generator
    assert not hasattr(gen, "media_proj")
    states = torch.randn(1, 5, gen.conditions.proj.in_features)
    media = torch.randn(1, 2, 4, model.vision.dim)
    targets = Targets(sample=torch.tensor([0]), image=torch.tensor([1]), position=torch.tensor([4]))
    context, keep = gen.context(states, torch.ones(1, 5, dtype=torch.long), media, targets)
    assert context.shape[1] == gen.cfg.num_conditions and keep.all()


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_drawing_is_seeded_and_guided(drawer, sampler):
    model, processor = drawer(sampler=sampler)
    prompts = [["here we have a red circle on a grey background."], ["a blue star."]]
    first = model.draw(processor, prompts, seed=3)
    again = model.draw(processor, prompts, seed=3)
    other = model.draw(processor, prompts, seed=4)
    unguided = model.draw(processor, prompts, seed=3, guidance_scale=1.0)
    assert [im.size for im in first] == [(32, 32), (32, 32)]
    raw = [im.tobytes() for im in (*first, *again, *other, *unguided)]
    assert raw[0] == raw[2] and raw[1] == raw[3]  # same computation, same seed
    assert raw[0] != raw[4] and raw[0] != raw[6]


def announcing_after(model, n: int):
    """Make the model write ``n`` tokens, then announce an image (a bias on the logits)."""
    original = model.language_model.logits
    boi = model.ids.begin_of_image

    def logits(hidden):
        out = original(hidden)
        out[..., model.ids.eos] = -1e4
        if logits.calls % (n + 1) == n:  # one call per generated token
            out[..., boi] = 1e4
        logits.calls += 1
        return out

    logits.calls = 0
    model.language_model.logits = logits


def kinds(doc):
    return ["image" if "image" in part else "text" for part in doc]


@pytest.mark.parametrize("mode", ["generate_texts", "generate_images"])
def test_generate_interleaved_alternates_text_and_images(drawer, mode):
    model, processor = drawer()
    announcing_after(model, 3)
    doc = model.generate_interleaved(processor, ["a page of shapes. "], mode=mode, num_iter=2, max_new_tokens=8)
    expected = ["text", "image"] * 2 if mode == "generate_texts" else ["image", "text"] * 2
    assert kinds(doc) == ["text", *expected]
    assert not doc[0].get("generated") and all(part["generated"] for part in doc[1:])
    assert all(part["image"].size == (32, 32) for part in doc if "image" in part)
    announcing_after(model, 3)
    again = model.generate_interleaved(processor, ["a page of shapes. "], mode=mode, num_iter=2, max_new_tokens=8)
    for a, b in zip(doc, again, strict=True):  # seeded: the same document again
        assert a["image"].tobytes() == b["image"].tobytes() if "image" in a else a == b


def test_generate_interleaved_stops_when_the_model_ends_the_document(drawer):
    model, processor = drawer()
    original = model.language_model.logits

    def ends(hidden):
        out = original(hidden)
        out[..., model.ids.eos] = 1e4
        return out

    model.language_model.logits = ends
    doc = model.generate_interleaved(processor, ["a page of shapes. "], num_iter=3)
    assert kinds(doc) == ["text"]  # EOS at once: nothing written, no image drawn


def test_generate_interleaved_rejects_bad_requests(drawer, make_model):
    model, processor = drawer()
    with pytest.raises(ValueError, match="mode must be one of"):
        model.generate_interleaved(processor, ["x"], mode="draw")
    for num_iter in (0, "3", 1.5, True):
        with pytest.raises(ValueError, match=r"num_iter must be an integer >= 1, got"):
            model.generate_interleaved(processor, ["x"], num_iter=num_iter)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate_interleaved(processor, [])
    with pytest.raises(ValueError, match="expected an interleaved list"):
        model.generate_interleaved(processor, "just a string")
    text_only = make_model()
    plain = Processor(text_only.tokenizer, text_only.image_processor)
    with pytest.raises(ValueError, match="no image generation head"):
        text_only.generate_interleaved(plain, ["x"])


def test_a_drawing_model_saves_and_loads(drawer, tmp_path):
    model, processor = drawer()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = Flamingo.from_pretrained(tmp_path)
    again = Processor.from_pretrained(tmp_path)
    assert loaded.config == model.config and again.tokens.begin_of_image == BOI
    prompts = [["a red circle."]]
    a = model.draw(processor, prompts, seed=1)[0]
    b = loaded.draw(again, prompts, seed=1)[0]
    assert a.tobytes() == b.tobytes()  # same weights, same computation


def test_a_text_only_model_is_unchanged_by_learning_to_draw(backbones, make_model, tmp_path):
    """Stage 2 -> stage 3: a text-only export, loaded into a model that draws (train.init_from),
    reads and writes text exactly as before (the new token only adds a logit column)."""
    text_only = make_model()
    text_only.save_pretrained(tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["image_generation"] is None
    reloaded = Flamingo.from_pretrained(tmp_path / "text")
    assert reloaded.image_generator is None
    assert "image_generation" not in json.dumps([n for n in reloaded.trainable_names])
    torch.manual_seed(1)
    drawing = Flamingo.from_config(draw_config(backbones))
    copied = init_weights(drawing, tmp_path / "text")
    assert not any(name.startswith("image_generator.") for name in copied)
    ids, mask, pixels = encode(text_only, ["<image>a photo of a red circle<|endofchunk|><image>two", "plain text here"])
    vocab = len(text_only.tokenizer)
    with torch.no_grad():
        before = text_only(ids, mask, pixels).logits
        after = drawing(ids, mask, pixels).logits
    assert after.shape[-1] == vocab + 1
    assert torch.equal(after[..., :vocab], before)  # same weights, same computation for these columns


def test_latent_space_with_a_local_vae(drawer, tmp_path):
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(tmp_path / "vae")
    model, processor = drawer(space="latent", vae=str(tmp_path / "vae"), image_size=32)
    assert model.image_generator.sample_size == 16  # two blocks: one downsampling
    model.train()
    out = model(**story_batch(processor))
    assert out.image_loss is not None and torch.isfinite(out.image_loss)
    model.eval()
    (image,) = model.draw(processor, [["a red circle."]])
    assert image.size == (32, 32)
    assert not any("vae" in name for name in model.state_dict())  # frozen and loaded by name, never saved


def test_an_unloadable_vae_is_one_line(drawer, tmp_path):
    with pytest.raises(ValueError, match="image_generation.vae: cannot load an AutoencoderKL from .*nowhere"):
        drawer(space="latent", vae=str(tmp_path / "nowhere"))


def test_the_perceiver_reads_the_token_embeddings_beside_the_last_states(drawer):
    model, processor = drawer()
    hidden = model.language_model.lm.config.hidden_size
    assert model.image_generator.conditions.proj.in_features == 2 * hidden
    ids = processor(["a red circle."])["input_ids"]
    states = model.generation_states(ids, torch.zeros(1, ids.shape[1], hidden))
    assert torch.equal(states[..., hidden:], model.language_model.embed(ids))  # the same lookup of the same ids
    plain, _ = drawer(read_embeddings=False)
    assert plain.image_generator.conditions.proj.in_features == hidden
    last = torch.randn(1, ids.shape[1], hidden)
    assert plain.generation_states(ids, last) is last


def test_the_decoder_also_reads_the_latest_tokens_themselves(drawer):
    model, _ = drawer(token_context=3)
    gen = model.image_generator
    q, width = gen.cfg.num_conditions, 3
    states = torch.randn(2, 6, gen.conditions.proj.in_features)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 0] = 0  # left padding
    media = torch.randn(2, 3, 4, model.vision.dim)
    targets = Targets(sample=torch.tensor([0, 1]), image=torch.tensor([0, 2]), position=torch.tensor([4, 1]))
    context, keep = gen.context(states, mask, media, targets)
    assert context.shape == (2, q + width + 3 * 4, gen.cfg.condition_dim)
    # target 0 reads tokens 4, 3, 2; target 1 only token 1 (0 is padding, -1 does not exist)
    assert keep[:, q : q + width].tolist() == [[True] * 3, [True, False, False]]
    with torch.no_grad():
        moved = states.clone()
        moved[0, 3] += torch.randn_like(moved[0, 3])  # a token in target 0's window
        after, _ = gen.context(moved, mask, media, targets)
        later = states.clone()
        later[0, 5] += torch.randn_like(later[0, 5])  # after target 0's token: never read
        unseen, _ = gen.context(later, mask, media, targets)
    assert (after[0, q + 1] - context[0, q + 1]).abs().max() > 1e-3 and torch.equal(after[0, q + 2], context[0, q + 2])
    # exact: the same shapes and operations, and a token outside a window, or masked from the
    # Perceiver (weight exactly 0), adds nothing; token q + 2 is computed from the same input alone
    assert torch.equal(unseen[keep], context[keep])
    # the pooled condition: the queries' mean plus the mean of the tokens read; the null one has no token
    pooled = gen.pooled(context, keep)
    expected = context[0, :q].mean(0) + context[0, q : q + width].mean(0)
    assert torch.allclose(pooled[0], expected, atol=1e-6)  # the same sums in another order
    assert torch.allclose(pooled[1], context[1, :q].mean(0) + context[1, q], atol=1e-6)
    null, null_keep = gen.null_context(context, keep)
    assert not null_keep[:, q:].any()
    assert torch.allclose(gen.pooled(null, null_keep), gen.null_condition.mean(0).expand(2, -1), atol=1e-6)
    with pytest.raises(ValueError, match="token_context"):
        ImageGenerationConfig(token_context=65)


def test_the_states_and_the_embeddings_count_whatever_their_scale(drawer):
    model, _ = drawer(token_context=2)
    gen = model.image_generator
    half = gen.conditions.proj.in_features // 2
    states = torch.randn(1, 5, 2 * half)
    targets = Targets(sample=torch.tensor([0]), image=torch.tensor([0]), position=torch.tensor([4]))
    mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        context, _ = gen.context(states, mask, None, targets)
        small = states.clone()
        small[..., half:] *= 0.1  # a small LM's embeddings beside its hidden states
        rescaled, _ = gen.context(small, mask, None, targets)
        changed = states.clone()
        changed[0, 3, half:] = torch.randn(half) * 0.1
        other, _ = gen.context(changed, mask, None, targets)
    # each part is normalised on its own: a smaller part is the same input (up to layer norm's eps)
    assert torch.allclose(rescaled, context, atol=2e-3)
    # and a small embedding that changes still changes the condition as much as a large one would
    assert (other - context).abs().max() > 0.1


def test_several_noise_draws_per_image(drawer):
    model, processor = drawer(noise_draws=3)
    model.train()
    rows = []
    model.image_generator.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    batch = story_batch(processor)
    out = model(**batch)
    targets = find_targets(batch["input_ids"], model.ids.image, model.ids.begin_of_image)
    assert rows == [3 * len(targets)] and out.image_loss > 0
    with pytest.raises(ValueError, match="noise_draws"):
        ImageGenerationConfig(noise_draws=0)


def test_draw_rejects_bad_requests(drawer):
    model, processor = drawer()
    for prompts, kwargs, message in [
        ([], {}, "no prompt"),
        ([[]], {}, "prompt 0 is empty"),
        (["a red circle."], {}, "prompt 0 is a string"),
        ([["a red circle."]], {"guidance_scale": -2.0}, "guidance_scale must be a finite number >= 0"),
        ([["a red circle."]], {"guidance_scale": float("inf")}, "guidance_scale must be a finite number >= 0"),
        ([["a red circle."]], {"guidance_scale": "3"}, "guidance_scale must be a finite number >= 0"),
        ([["a red circle."]], {"image_guidance_scale": -1.0}, "image_guidance_scale must be a finite number >= 0"),
        ([["a red circle."]], {"image_guidance_scale": True}, "image_guidance_scale must be a finite number >= 0"),
        ([["a red circle."]], {"inference_steps": 0}, r"inference_steps must be an integer in \[1, 1000\]"),
        ([["a red circle."]], {"inference_steps": 2000}, r"inference_steps must be an integer in \[1, 1000\]"),
        ([["a red circle."]], {"seed": None}, r"seed must be an integer in \[0, 2\*\*63\), got None"),
        ([["a red circle."]], {"seed": "1"}, "seed must be an integer"),
        ([["a red circle."]], {"seed": 1.5}, "seed must be an integer"),
        ([["a red circle."]], {"seed": -1}, "seed must be an integer"),
        ([["a red circle."]], {"seed": 2**64}, "seed must be an integer"),
        ([["a red", "circle."]] * 2, {"seed": 2**63 - 1}, r"below 2\*\*63 - len\(prompts\)"),
        ([["a red circle.", f"two {BOI}"]], {}, "prompt 0, item 1: the text contains the begin-of-image token"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.draw(processor, prompts, **kwargs)
    for kwargs in ({"guidance_scale": float("nan")}, {"seed": "0"}):
        with pytest.raises(ValueError, match="must be"):
            model.generate_interleaved(processor, ["a page."], **kwargs)
    with pytest.raises(ValueError, match="prompt, item 0: the text contains the begin-of-image token"):
        model.generate_interleaved(processor, [f"a page.{BOI}"])


def test_drawing_refuses_a_processor_that_cannot_announce_an_image(drawer, make_model):
    model, _ = drawer()
    with pytest.raises(ValueError, match="processor: expected an interleaf Processor, got NoneType"):
        model.draw(None, [["a red circle."]])
    text_only = make_model()  # a tokenizer without <|beginofimage|>
    plain = Processor(text_only.tokenizer, text_only.image_processor)
    for call in (lambda: model.draw(plain, [["a red circle."]]), lambda: model.generate_interleaved(plain, ["x"])):
        with pytest.raises(ValueError, match=r"processor: its tokenizer gives the begin-of-image token .* id None"):
            call()


def test_a_prompt_draws_the_same_picture_wherever_it_stands_in_a_batch(drawer):
    """Prompt i draws from the noise of seed + i: alone, with that seed, it draws the same picture.
    Equal up to rounding: the batch pads and multiplies rows together (measured here: identical or
    off by one level of 255); a different seed changes it by far more."""
    model, processor = drawer()
    prompts = [["here we have a red circle on a grey background."], ["a blue star."], ["two small green squares."]]
    batched = [np.asarray(im, dtype=np.int16) for im in model.draw(processor, prompts, seed=5)]
    for i, prompt in enumerate(prompts):
        (alone,) = model.draw(processor, [prompt], seed=5 + i)
        (other,) = model.draw(processor, [prompt], seed=50 + i)
        assert np.abs(batched[i] - np.asarray(alone, dtype=np.int16)).max() <= 2, i
        assert np.abs(batched[i] - np.asarray(other, dtype=np.int16)).mean() > 10, i


def test_configs_built_in_python_are_checked_as_strictly_as_from_json():
    for kwargs, message in [
        ({"mmfs_pixels": 1.5}, r"ImageGenerationConfig.mmfs_pixels: expected int, got 1.5"),
        ({"mmfs_pixels": "16"}, r"ImageGenerationConfig.mmfs_pixels: expected int, got '16'"),
        ({"mmfs": "yes"}, r"ImageGenerationConfig.mmfs: expected bool, got 'yes'"),
        ({"num_conditions": True}, r"ImageGenerationConfig.num_conditions: expected int, got True"),
        ({"guidance_scale": float("nan")}, r"ImageGenerationConfig.guidance_scale: expected a finite number"),
        ({"pixel_mean": (0.5, "x", 0.5)}, r"ImageGenerationConfig.pixel_mean: \[1\]: expected a number"),
        ({"mmfs_pixels": -1}, r"^ImageGenerationConfig.mmfs_pixels must be >= 0, got -1$"),
        ({"loss_weight": -1.0}, r"^ImageGenerationConfig.loss_weight must be >= 0, got -1.0$"),
        ({"snr_gamma": -1}, r"^ImageGenerationConfig.snr_gamma must be >= 0"),
        ({"inference_steps": 1001}, r"inference_steps \(1001\) must be at most train_timesteps \(1000\)"),
        ({"mmfs": False, "mmfs_pixels": 4}, r"mmfs_pixels=4 set with mmfs=False"),
        ({"mmfs": False, "mmfs_features": "patches"}, r"mmfs_features='patches' set with mmfs=False"),
    ]:
        with pytest.raises(ValueError, match=message):
            ImageGenerationConfig(**kwargs)
    assert ImageGenerationConfig(guidance_scale=3, inference_steps=1000).guidance_scale == 3  # an int is a number
    for kwargs, message in [
        (
            {"down_block_types": ("DownBlock2D", "Down", "DownBlock2D")},
            r"UNetConfig.down_block_types\[1\]: expected one of \['DownBlock2D', 'CrossAttnDownBlock2D'\], got 'Down'",
        ),
        ({"up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}, r"UNetConfig.up_block_types\[1\]"),
        ({"norm_num_groups": 6}, r"UNetConfig.block_out_channels\[0\] = 16: .* multiple of norm_num_groups \(6\)"),
        ({"block_out_channels": (16, 0, 64)}, r"UNetConfig.block_out_channels\[1\] = 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            UNetConfig(**kwargs)


def test_decoupled_mmfs_reads_the_images_through_a_gate_of_their_own(drawer, tmp_path):
    model, processor = drawer(mmfs_attention="decoupled")
    gen = model.image_generator
    gates = [m.gate for m in gen.unet.modules() if isinstance(m, DecoupledMedia)]
    assert gates and all(g.item() == 0 for g in gates)
    q = gen.cfg.num_conditions + gen.cfg.token_context
    n, images = 2, 2 * 4
    context = torch.randn(n, q + images, gen.cfg.condition_dim)
    keep = torch.ones(n, q + images, dtype=torch.bool)
    keep[1, q:] = False  # sample 1 has no earlier image
    x, t = torch.randn(n, 3, gen.sample_size, gen.sample_size), torch.tensor([10, 500])
    with torch.no_grad():
        start = gen.denoise(x, t, context, keep)
        text_only = gen.denoise(x, t, context[:, :q], keep[:, :q])
        # a closed gate adds exactly 0 x (the images' attention), and the text part is the same slice
        # through the same operations: the same numbers as without the images
        assert torch.equal(start, text_only)
        for g in gates:
            g.fill_(0.5)
        opened = gen.denoise(x, t, context, keep)
        other = context.clone()
        other[:, q:] = torch.randn_like(other[:, q:])
        moved = gen.denoise(x, t, other, keep)
    assert (opened[0] - moved[0]).abs().max() > 1e-4  # sample 0 reads its images
    # exact: one batch of the same shapes, and sample 1's image term is multiplied by 0
    assert torch.equal(opened[1], moved[1])  # sample 1 has none: nothing to read
    model.train()
    out = model(**story_batch(processor))
    out.loss.backward()
    assert all(g.grad is not None for g in gates)
    model.save_pretrained(tmp_path / "m")
    loaded = Flamingo.from_pretrained(tmp_path / "m")
    assert loaded.image_generator.unet.state_dict().keys() == gen.unet.state_dict().keys()
    assert any(k.endswith("attn2.processor.gate") for k in gen.unet.state_dict())


@pytest.mark.parametrize("features", ["resampled", "patches"])
def test_mmfs_reads_the_resampled_latents_or_the_patch_features(drawer, features):
    model, processor = drawer(mmfs_features=features)
    batch = story_batch(processor)
    latents, patches = model.encode_images_and_features(batch["input_ids"], batch["pixel_values"])
    assert latents.shape[:2] == patches.shape[:2] and latents.shape[-1] == patches.shape[-1] == model.vision.dim
    assert latents.shape[2] == model.config.resampler.num_latents
    with torch.no_grad():  # the vision encoder's tokens (its CLS and patch tokens), before the resampler
        encoded = model.vision(batch["pixel_values"][0, :1])
    assert patches.shape[2] == encoded.shape[1]
    # exact: encode_images is the same computation on the same inputs, its first half
    assert torch.equal(model.encode_images(batch["input_ids"], batch["pixel_values"]), latents)
    read = []
    gen = model.image_generator
    context = gen.context
    gen.context = lambda states, mask, media, *rest: read.append(media) or context(states, mask, media, *rest)
    model(**batch)
    (media,) = read
    # the same module on the same inputs: the same numbers
    assert torch.equal(media, patches if features == "patches" else latents)


def test_pooled_mmfs_starts_from_the_text_condition_and_then_reads_the_images(drawer):
    model, _ = drawer(mmfs_pooled=True)
    gen = model.image_generator
    text = gen.cfg.num_conditions + gen.cfg.token_context
    context = torch.randn(2, text + 4, gen.cfg.condition_dim)
    keep = torch.ones(2, text + 4, dtype=torch.bool)
    keep[1, text:] = False  # sample 1 has no earlier image
    with torch.no_grad():
        # zero-initialised: adds exactly 0 to the text's pooled condition
        assert torch.equal(gen.pooled(context, keep), gen.pooled(context[:, :text], keep[:, :text]))
        torch.nn.init.normal_(gen.media_pool.weight)
        other = context.clone()
        other[:, text:] = torch.randn_like(other[:, text:])
        before, after = gen.pooled(context, keep), gen.pooled(other, keep)
        null = [gen.pooled(*gen.null_context(c, keep)) for c in (context, other)]
    assert (before[0] - after[0]).abs().max() > 1e-3  # sample 0 reads its image
    # exact: sample 1's images are masked out (a sum of zeros), and so are all in the null condition
    assert torch.equal(before[1], after[1]) and torch.equal(null[0], null[1])


def test_aligned_mmfs_reads_each_image_where_the_query_is(drawer, tmp_path):
    with pytest.raises(ValueError, match="needs mmfs_features='patches'"):
        ImageGenerationConfig(mmfs_attention="aligned")
    model, processor = drawer(mmfs_attention="aligned", mmfs_features="patches")
    gen = model.image_generator
    procs = [m for m in gen.unet.modules() if isinstance(m, AlignedMedia)]
    assert procs and all(p.gate.item() == 0 for p in procs)
    tokens = model.vision.num_tokens
    side = procs[0].grid
    assert side * side in (tokens, tokens - 1)
    q = gen.cfg.num_conditions + gen.cfg.token_context
    n, images = 2, 2
    context = torch.randn(n, q + images * tokens, gen.cfg.condition_dim)
    keep = torch.ones(n, q + images * tokens, dtype=torch.bool)
    keep[1, q:] = False  # sample 1 has no earlier image
    x, t = torch.randn(n, 3, gen.sample_size, gen.sample_size), torch.tensor([10, 500])
    with torch.no_grad():
        # a closed gate adds exactly 0 x (the images' part): the same numbers as the text alone
        assert torch.equal(gen.denoise(x, t, context, keep), gen.denoise(x, t, context[:, :q], keep[:, :q]))
        for p in procs:
            p.gate.fill_(0.5)
        # the top-left patch of sample 0's images changed: the UNet's output moves most in its
        # top-left quarter (the convolutions spread it some)
        other = context.clone()
        grid = other[:, q:].view(n, images, tokens, -1)[:, :, tokens - side * side :]
        grid.view(n, images, side, side, -1)[0, :, 0, 0] += 10  # the top-left patch
        opened, moved = gen.denoise(x, t, context, keep), gen.denoise(x, t, other, keep)
    change = (opened[0] - moved[0]).abs().mean(0)  # (H, W)
    h = change.shape[0]
    assert change[: h // 2, : h // 2].mean() > 2 * change[h // 2 :, h // 2 :].mean()
    # exact: one batch of the same shapes, and sample 1's image term is multiplied by 0
    assert torch.equal(opened[1], moved[1])
    model.train()
    out = model(**story_batch(processor))
    out.loss.backward()
    assert all(p.gate.grad is not None for p in procs)
    model.save_pretrained(tmp_path / "m")
    loaded = Flamingo.from_pretrained(tmp_path / "m")
    assert loaded.image_generator.unet.state_dict().keys() == gen.unet.state_dict().keys()


def test_the_finest_mmfs_scale_reads_the_earlier_image_itself_where_the_query_is(drawer):
    with pytest.raises(ValueError, match="mmfs_pixels .* needs mmfs_attention='aligned'"):
        ImageGenerationConfig(mmfs_pixels=16, mmfs_features="patches")
    with pytest.raises(ValueError, match="mmfs_pixels 5 does not divide image_size 32"):
        drawer(mmfs_attention="aligned", mmfs_features="patches", mmfs_pixels=5)
    with pytest.raises(ValueError, match="max_images must be >= 1"):
        ImageGenerationConfig(max_images=0)
    with pytest.raises(ValueError, match="ImageGenerationConfig.unet: expected a UNetConfig, got dict"):
        ImageGenerationConfig(unet={"foo": 1})
    model, processor = drawer(mmfs_attention="aligned", mmfs_features="patches", mmfs_pixels=16)
    gen = model.image_generator
    procs = [m for m in gen.unet.modules() if isinstance(m, AlignedMedia)]
    assert procs and all(p.fine == 16 * 16 for p in procs)
    for p in procs:
        p.gate.data.fill_(0.5)
    # two samples: an image, then "the same shape in blue." and a drawn one (the target)
    first = tinyworld.render(tinyworld.drawn_scene(random.Random(1)), 32)
    items = [first, "the same shape in blue.", BOI, first]
    batch = processor([items, items])
    pixels = batch["pixel_values"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = find_targets(ids, model.ids.image, model.ids.begin_of_image)
    assert targets.image.tolist() == [1, 1]
    with torch.no_grad():
        latents, features = model.encode_images_and_features(ids, pixels, features=True)
        states = model.generation_states(
            ids, model.step(ids, history_ids=ids, attention_mask=mask, media=model.media(latents)).last_hidden_state
        )
        context, keep = gen.context(states, mask, features, targets, pixels)
        tokens = model.vision.num_tokens
        assert context.shape[1] == gen.cfg.num_conditions + gen.cfg.token_context + 2 * (tokens + 16 * 16)
        # the target (image 1) is never read, to the last bit: only image 0's cells are kept
        changed = pixels.clone()
        changed[:, 1] = torch.randn_like(changed[:, 1])
        again, keep_again = gen.context(states, mask, features, targets, changed)
        assert torch.equal(again[keep], context[keep]) and torch.equal(keep, keep_again)
        # the earlier image's top-left pixels changed in sample 0: the drawing's top-left moves most
        moved = pixels.clone()
        moved[0, 0, :, :16, :16] = 3.0
        other, _ = gen.context(states, mask, features, targets, moved)
        x, t = torch.randn(2, 3, 32, 32), torch.tensor([300, 300])
        before, after = gen.denoise(x, t, context, keep), gen.denoise(x, t, other, keep)
    change = (before[0] - after[0]).abs().mean(0)
    assert change[:16, :16].mean() > 2 * change[16:, 16:].mean()
    # exact: the same batch, and sample 1's pixels did not change
    assert torch.equal(before[1], after[1])
    with pytest.raises(ValueError, match="mmfs_pixels: the earlier images' pixels were not given"):
        gen.context(states, mask, features, targets)
    model.train()
    out = model(**story_batch(processor))
    out.loss.backward()
    assert gen.pixel_proj.weight.grad is not None and all(p.null_key.grad is not None for p in procs)
    model.eval()
    (image,) = model.draw(processor, [[first, "the same shape in blue."]])
    assert image.size == (32, 32)


@pytest.mark.parametrize("attention", ["decoupled", "aligned"])
def test_the_text_gate_lets_what_the_text_asks_decide_how_much_of_an_earlier_image_is_read(drawer, attention):
    with pytest.raises(ValueError, match="mmfs_gate='text' .* needs mmfs_attention 'decoupled' or 'aligned'"):
        ImageGenerationConfig(mmfs_gate="text")
    with pytest.raises(ValueError, match="mmfs_gate='text' set with mmfs=False"):
        ImageGenerationConfig(mmfs=False, mmfs_gate="text")
    features = "patches" if attention == "aligned" else "resampled"
    gen_cfg = dict(mmfs_attention=attention, mmfs_features=features, mmfs_pooled=features == "patches")
    model, processor = drawer(**gen_cfg, mmfs_gate="text")
    scalar, _ = drawer(**gen_cfg)  # the same seed: the same weights, less the text gates
    gen = model.image_generator
    procs = [m for m in gen.unet.modules() if isinstance(m, DecoupledMedia)]
    assert procs and all(p.text_gate is not None for p in procs)
    extra = {k for k in gen.state_dict() if "text_gate" in k or "media_pool_gate" in k}
    assert gen.state_dict().keys() - scalar.image_generator.state_dict().keys() == extra
    scalar.image_generator.load_state_dict({k: v for k, v in gen.state_dict().items() if k not in extra})
    q = gen.cfg.num_conditions + gen.cfg.token_context
    tokens = model.vision.num_tokens if attention == "aligned" else model.config.resampler.num_latents
    n = 2
    context = torch.randn(n, q + tokens, gen.cfg.condition_dim)
    keep = torch.ones(n, q + tokens, dtype=torch.bool)
    x, t = torch.randn(n, 3, gen.sample_size, gen.sample_size), torch.tensor([200, 600])
    for g in (gen, scalar.image_generator):
        for p in (m for m in g.unet.modules() if isinstance(m, DecoupledMedia)):
            p.gate.data.fill_(0.5)
    with torch.no_grad():
        # zero at the start: the gate is the scalar gate's, to rounding (a sum of zeros added)
        torch.testing.assert_close(
            gen.denoise(x, t, context, keep), scalar.image_generator.denoise(x, t, context, keep), rtol=0, atol=1e-6
        )
        for p in procs:
            torch.nn.init.normal_(p.text_gate.weight, std=2.0)
        # the gate now reads the text: another text, the same image, another drawing ...
        other = context.clone()
        other[:, : gen.cfg.num_conditions] = torch.randn_like(other[:, : gen.cfg.num_conditions])
        p = procs[0]
        inner = p.to_v.out_features

        def heads(v):
            return v.view(n, -1, 2, inner // 2).transpose(1, 2)

        a, b = p.gates(context[:, :q], None, heads), p.gates(other[:, :q], None, heads)
        assert a.shape == (n, 2, 1, inner // 2) and (a - b).abs().max() > 1e-2
        # ... and a text that shuts the gate reads no image at all: the text part's output alone
        for p in procs:
            p.gate.data.fill_(0.0)
            p.text_gate.weight.data.zero_()
            p.text_gate.bias.data.zero_()
        # exact: the same shapes, and the images' part multiplied by tanh(0) = 0
        assert torch.equal(gen.denoise(x, t, context, keep), gen.denoise(x, t, context[:, :q], keep[:, :q]))
    model.train()
    model(**story_batch(processor)).loss.backward()
    assert all(p.text_gate.weight.grad is not None for p in procs)


def test_image_dropout_hides_the_earlier_images_of_some_draws_and_keeps_their_text(drawer):
    with pytest.raises(ValueError, match=r"image_dropout must be in \[0, 1\)"):
        ImageGenerationConfig(image_dropout=1.0)
    with pytest.raises(ValueError, match="image_dropout=0.1 set with mmfs=False"):
        ImageGenerationConfig(mmfs=False, image_dropout=0.1)
    seen = []
    for dropout in (0.0, 0.999):
        model, processor = drawer(image_dropout=dropout, condition_dropout=0.0)
        gen = model.image_generator
        denoise = gen.denoise
        gen.denoise = lambda x, t, context, keep, d=denoise: seen.append(keep) or d(x, t, context, keep)
        torch.manual_seed(0)
        model(**story_batch(processor))
    text = gen.cfg.num_conditions + gen.cfg.token_context
    kept, hidden = seen
    assert kept[:, text:].any()  # some targets have an earlier image to read ...
    assert not hidden[:, text:].any()  # ... and with image_dropout none of them read it
    assert torch.equal(kept[:, :text], hidden[:, :text])  # the text is kept, to the last vector


def test_image_guidance_weighs_the_earlier_images_apart_from_the_text(drawer):
    with pytest.raises(ValueError, match="image_guidance_scale must be >= 0"):
        ImageGenerationConfig(image_guidance_scale=-1.0)
    model, processor = drawer(mmfs_attention="aligned", mmfs_features="patches", mmfs_pixels=16)
    for p in model.image_generator.unet.modules():
        if isinstance(p, AlignedMedia):
            p.gate.data.fill_(0.5)
    first = tinyworld.render(tinyworld.drawn_scene(random.Random(1)), 32)
    prompts = [[first, "the same shape in blue."], ["here we have a red circle."]]
    plain = model.draw(processor, prompts, seed=5, inference_steps=4)
    # at the text's own scale it is the plain guidance: the same computation, to the bit
    same = model.draw(processor, prompts, seed=5, inference_steps=4, image_guidance_scale=3.0)
    assert [im.tobytes() for im in same] == [im.tobytes() for im in plain]
    ignored = model.draw(processor, prompts, seed=5, inference_steps=4, image_guidance_scale=0.0)
    weighed = model.draw(processor, prompts, seed=5, inference_steps=4, image_guidance_scale=1.5)
    # a prompt with no earlier image draws the same whatever the images' scale (pixels of
    # 8 bits: the batch of three rows rounds its sums otherwise than that of two, far below a level)
    for other in (ignored, weighed):
        assert np.abs(np.asarray(other[1], float) - np.asarray(plain[1], float)).max() <= 1
    # at 0 the earlier image is not read at all: what the text alone draws (the picture masked out)
    gen = model.image_generator
    captured = []
    sample = gen.sample
    gen.sample = lambda context, keep, **kw: captured.append((context, keep)) or sample(context, keep, **kw)
    model.draw(processor, prompts[:1], seed=5, inference_steps=4)
    gen.sample = sample
    ((context, keep),) = captured
    text = gen.cfg.num_conditions + gen.cfg.token_context
    blind = torch.cat([keep[:, :text], torch.zeros_like(keep[:, text:])], 1)
    noise = [torch.Generator().manual_seed(5)]
    alone = gen.sample(context, blind, generator=noise, steps=4)
    noise = [torch.Generator().manual_seed(5)]
    zero = gen.sample(context, keep, generator=noise, steps=4, image_guidance_scale=0.0)
    torch.testing.assert_close(zero, alone, rtol=0, atol=1e-4)  # two rows against three: rounding
    assert np.abs(np.asarray(weighed[0], float) - np.asarray(ignored[0], float)).mean() > 1
