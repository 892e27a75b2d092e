import logging
import warnings

import pytest
import torch
import transformers

from interleaf.generation import GenerationConfig, stream
from interleaf.tiny import LM_FAMILIES

from conftest import TEXTS, encode

NO_STOP = dict(stop_at_eos=False, stop_at_end_of_chunk=False)


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_cached_generation_equals_recomputing_everything(make_model, family):
    model = make_model(family)
    ids, mask, pixels = encode(model, TEXTS)
    cached = model.generate(ids, mask, pixels, max_new_tokens=6, **NO_STOP)
    recomputed = model.generate(ids, mask, pixels, max_new_tokens=6, use_cache=False, **NO_STOP)
    assert cached.shape == (3, 6)
    # token ids, exact although the shapes differ (one new position vs the whole sequence, whose
    # logits may differ in the last bits, ~1e-6, across CPUs): every greedy step of these seeded
    # tiny models has a top-2 log-prob gap >= 2e-4, so argmax cannot flip on rounding
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("family, side", [(f, "left") for f in ("llama", "gpt2", "opt", "mpt")] + [("llama", "right")])
def test_batched_padded_generation_equals_one_by_one(make_model, family, side):
    model = make_model(family)
    ids, mask, pixels = encode(model, TEXTS, padding_side=side)
    batched = model.generate(ids, mask, pixels, max_new_tokens=6, **NO_STOP)
    for i, text in enumerate(TEXTS):
        one_ids, one_mask, _ = encode(model, [text])
        one = model.generate(one_ids, one_mask, pixels[i : i + 1], max_new_tokens=6, **NO_STOP)
        # exact ids from differently shaped runs: safe, top-2 gaps >= 2e-4 vs ~1e-6 rounding (above)
        assert torch.equal(one[0], batched[i]), f"prompt {i}"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_media_are_encoded_once_per_call(make_model, num_beams):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    encoded, projections = [], []
    hook = model.vision.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    original = model.blocks[0].project_media
    model.blocks[0].project_media = lambda media: projections.append(1) or original(media)
    try:
        model.generate(ids, mask, pixels, max_new_tokens=5, num_beams=num_beams, **NO_STOP)
    finally:
        hook.remove()
        del model.blocks[0].project_media
    assert encoded == [int((ids == model.ids.image).sum())]  # each real image once, not once per beam
    assert len(projections) == 1


def test_beam_search_with_one_beam_is_greedy(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    greedy = model.generate(ids, mask, pixels, max_new_tokens=5, **NO_STOP)
    beam1 = model.generate(ids, mask, pixels, max_new_tokens=5, num_beams=1, **NO_STOP)
    assert torch.equal(greedy, beam1)


def sequence_logprob(model, ids, mask, pixels, continuation):
    full = torch.cat([ids, continuation[None]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation[None])], dim=1)
    logp = model(full, full_mask, pixels).logits.log_softmax(-1)
    n = continuation.shape[0]
    return logp[0, -n - 1 : -1].gather(-1, continuation[:, None]).sum().item()


def test_beam_search_with_enough_beams_is_exhaustive(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS[1:2])
    vocab = len(model.tokenizer)
    best = model.generate(ids, mask, pixels, max_new_tokens=2, num_beams=vocab, length_penalty=0.0, **NO_STOP)[0]
    # brute force: every first token, then its best second token (<image> and pad are banned)
    banned = [model.ids.image, model.ids.pad]
    allowed = torch.tensor([t for t in range(vocab) if t not in banned])

    def logprobs(logits):
        logits = logits.clone()
        logits[:, banned] = float("-inf")
        return logits.log_softmax(-1)

    with torch.no_grad():
        first = logprobs(model(ids, mask, pixels).logits[:, -1])[0, allowed]
        ids2 = torch.cat([ids.expand(len(allowed), -1), allowed[:, None]], dim=1)
        images = pixels.expand(len(allowed), -1, -1, -1, -1)
        second = logprobs(model(ids2, torch.ones_like(ids2), images).logits[:, -1])
    flat = int((first[:, None] + second).argmax())
    assert best.tolist() == [int(allowed[flat // vocab]), flat % vocab]
    greedy = model.generate(ids, mask, pixels, max_new_tokens=2, **NO_STOP)[0]
    assert sequence_logprob(model, ids, mask, pixels, best) >= sequence_logprob(model, ids, mask, pixels, greedy)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "mpt"])
def test_beam_search_cached_equals_recomputed_and_batched(make_model, family):
    model = make_model(family)
    ids, mask, pixels = encode(model, TEXTS)
    a = model.generate(ids, mask, pixels, max_new_tokens=5, num_beams=3, **NO_STOP)
    b = model.generate(ids, mask, pixels, max_new_tokens=5, num_beams=3, use_cache=False, **NO_STOP)
    # exact ids from differently shaped runs (here and below): the 3rd and 4th best candidates of
    # every step are >= 1e-4 apart in these tiny models, far above the ~1e-6 rounding across CPUs
    assert torch.equal(a, b)
    one_ids, one_mask, _ = encode(model, [TEXTS[1]])
    one = model.generate(one_ids, one_mask, pixels[1:2], max_new_tokens=5, num_beams=3, **NO_STOP)
    assert torch.equal(one[0], a[1])


def test_sampling_is_seeded_and_top_k_1_is_greedy(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, **NO_STOP)
    a = model.generate(ids, mask, pixels, seed=1, **kw)
    assert torch.equal(a, model.generate(ids, mask, pixels, seed=1, **kw))
    assert not torch.equal(a, model.generate(ids, mask, pixels, seed=2, **kw))
    greedy = model.generate(ids, mask, pixels, max_new_tokens=8, **NO_STOP)
    assert torch.equal(model.generate(ids, mask, pixels, seed=3, top_k=1, **kw), greedy)
    assert torch.equal(model.generate(ids, mask, pixels, seed=3, top_p=1e-6, **kw), greedy)


def force_token(model, token_id, from_step):
    """Make ``token_id`` overwhelmingly likely from decoding step ``from_step`` on."""
    original = model.language_model.logits
    calls = {"n": 0}

    def patched(hidden):
        logits = original(hidden)
        if hidden.dim() == 2:  # a decoding step (last position only)
            calls["n"] += 1
            if calls["n"] > from_step:
                logits[..., token_id] += 1e4
        return logits

    model.language_model.logits = patched


@pytest.mark.parametrize("which", ["end_of_chunk", "eos"])
def test_stops_at_end_of_chunk_and_eos(make_model, which):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS[:1])
    token = getattr(model.ids, which)
    force_token(model, token, from_step=2)
    out = model.generate(ids, mask, pixels, max_new_tokens=10)
    assert out.shape == (1, 3) and out[0, -1] == token
    force_token(model, token, from_step=0)
    out = model.generate(ids, mask, pixels, max_new_tokens=10, min_new_tokens=4)
    assert out.shape[1] >= 5 and token not in out[0, :4].tolist()


def test_batched_stopping_pads_finished_rows(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS)
    free = model.generate(ids, mask, pixels, max_new_tokens=6, **NO_STOP)
    stop_text = model.tokenizer.decode(free[0, :3])
    out = model.generate(ids, mask, pixels, max_new_tokens=6, stop_strings=[stop_text], **NO_STOP)
    assert torch.equal(out[0, :3], free[0, :3]) and (out[0, 3:] == model.ids.pad).all()
    for row in (1, 2):  # the other rows run on, unless the stop string shows up in them too
        text = model.tokenizer.decode(free[row])
        if stop_text not in text:
            assert torch.equal(out[row], free[row])


def test_stream_yields_the_generated_text(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS[:1])
    pieces = list(stream(model, ids, mask, pixels, max_new_tokens=8, **NO_STOP))
    full = model.generate(ids, mask, pixels, max_new_tokens=8, **NO_STOP)
    assert "".join(pieces) == model.tokenizer.decode(full[0], skip_special_tokens=True)
    assert len(pieces) > 1
    with pytest.raises(ValueError, match="one prompt"):
        list(stream(model, *encode(model, TEXTS), max_new_tokens=2))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(num_beams=2, do_sample=True), "sampling with beams"),
        (dict(max_new_tokens=2, min_new_tokens=3), "min_new_tokens"),
        (dict(top_k=5), "only with do_sample"),
    ],
)
def test_bad_generation_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**bad)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_cached_generation_uses_no_deprecated_transformers_api(make_model, family):
    """Neither a Python warning nor one of transformers' logged, once-only deprecation notices
    (``logger.warning_once``, e.g. for ``past_key_values``): our cache calls use current names."""
    model = make_model(family)
    ids, mask, pixels = encode(model, TEXTS)
    hf_logging = transformers.utils.logging
    records, root, verbosity = _Records(), hf_logging.get_logger(), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # conftest keeps transformers quiet (errors only)
    hf_logging.warning_once.cache_clear()  # notices already given once in this process count too
    root.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.generate(ids, mask, pixels, max_new_tokens=3, **NO_STOP)
            model.generate(ids, mask, pixels, max_new_tokens=3, num_beams=2, **NO_STOP)  # reorders the cache
    finally:
        root.removeHandler(records)
        hf_logging.set_verbosity(verbosity)
    assert not [m for m in records.messages if "deprecat" in m.lower()]
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
