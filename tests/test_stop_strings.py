"""Stop strings: detected however many tokens they span, trimmed from the text (never from
the token ids), and never streamed."""

from types import SimpleNamespace

import pytest
import torch

from interleaf.generation import GenerationConfig, StopRule, decode, stream, trim_at_stop
from interleaf.tiny import build_tokenizer

from conftest import TEXTS, encode

NO_STOP = dict(stop_at_eos=False, stop_at_end_of_chunk=False)
# Mostly single-character tokens in the tiny tokenizer: far more than 32 tokens.
LONG_STOP = "#### END OF THE ANSWER, zqxj vkwz #### 0987654321 ####"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_step_containing(tokenizer, ids: list[int], stop: str) -> int:
    """How many tokens it takes until the decoded text first contains ``stop``."""
    return next(n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n]))


def force_text(model, ids: list[int]) -> None:
    """Make the model emit ``ids`` in order, one per decoding step (replacing an earlier forcing)."""
    model.language_model.__dict__.pop("logits", None)
    original = model.language_model.logits
    step = {"n": 0}

    def patched(hidden):
        logits = original(hidden)
        if hidden.dim() == 2 and step["n"] < len(ids):  # a decoding step (last position only)
            logits[..., ids[step["n"]]] += 1e4
            step["n"] += 1
        return logits

    model.language_model.logits = patched


# -- trim_at_stop ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("a cat. Question: what", ["Question"], "a cat. "),
        ("a cat. Question: what", [], "a cat. Question: what"),
        ("a cat. Question: what", ["Answer"], "a cat. Question: what"),
        ("Question first", ["Question"], ""),
        ("one, two Answer three", ["Answer", ", "], "one"),  # the earliest wins, not the first listed
        ("xab", ["ab", "b"], "x"),  # overlapping stops
        ("abc", ["", "c"], "ab"),  # empty stop strings are ignored
        ("stop stop", ("stop",), ""),
        ("", ["x"], ""),
    ],
)
def test_trim_at_stop(text, stops, expected):
    assert trim_at_stop(text, stops) == expected


def test_empty_stop_strings_are_rejected():
    with pytest.raises(ValueError, match="stop_strings"):
        GenerationConfig(stop_strings=("",))


# -- StopRule ---------------------------------------------------------------------------------


def stop_rule(tokenizer, *stops: str) -> StopRule:
    ids = SimpleNamespace(eos=tokenizer.eos_token_id, end_of_chunk=None)
    model = SimpleNamespace(ids=ids, tokenizer=tokenizer)
    return StopRule(model, GenerationConfig(stop_strings=stops))


def test_stop_rule_finds_a_stop_string_spanning_more_than_32_tokens(tokenizer):
    prefix, tail = token_ids(tokenizer, "a red circle. "), token_ids(tokenizer, " and more text")
    stop_ids = token_ids(tokenizer, LONG_STOP)
    assert len(stop_ids) > 32
    generated = prefix + stop_ids + tail
    rule = stop_rule(tokenizer, LONG_STOP)
    fired = [n for n in range(1, len(generated) + 1) if rule(generated[:n])]
    assert fired[0] == len(prefix) + len(stop_ids)


def test_stop_rule_fires_where_a_stop_string_ends_inside_a_token(tokenizer):
    ids = token_ids(tokenizer, "hello")
    assert tokenizer.convert_ids_to_tokens(ids) == ["h", "e", "ll", "o"]
    rule = stop_rule(tokenizer, "el")
    assert [rule(ids[:n]) for n in range(1, 5)] == [False, False, True, True]
    assert not stop_rule(tokenizer, "hallo")(ids)
    assert stop_rule(tokenizer, "x", "llo")(ids)


# -- decode --------------------------------------------------------------------------------------


def test_decode_skips_special_tokens_and_trims_each_row(tokenizer):
    eos = tokenizer.eos_token_id
    a = [*token_ids(tokenizer, "a cat. Question: what"), eos]
    b = token_ids(tokenizer, "two dogs")
    ids = torch.tensor([a, b + [eos] * (len(a) - len(b))])  # padded with EOS, as generate pads
    assert decode(tokenizer, ids, ["Question"]) == ["a cat. ", "two dogs"]
    assert decode(tokenizer, ids) == ["a cat. Question: what", "two dogs"]
    assert decode(tokenizer, [a], "what") == ["a cat. Question: "]  # one string is one stop string


# -- generation end to end -----------------------------------------------------------------------


def test_generation_stops_at_a_stop_string_spanning_more_than_32_tokens(make_model):
    model = make_model()
    tok = model.tokenizer
    ids, mask, pixels = encode(model, TEXTS[:1])
    text = "a red circle. " + LONG_STOP + " more text after it"
    forced = token_ids(tok, text)
    assert len(token_ids(tok, LONG_STOP)) > 32
    expected = first_step_containing(tok, forced, LONG_STOP)
    force_text(model, forced)
    out = model.generate(ids, mask, pixels, max_new_tokens=len(forced), stop_strings=[LONG_STOP], **NO_STOP)
    assert out[0].tolist() == forced[:expected]  # the ids are not trimmed
    assert decode(tok, out, [LONG_STOP]) == ["a red circle. "]


def test_token_ids_keep_the_token_that_completes_a_stop_string(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS[:1])
    forced = token_ids(model.tokenizer, "hello there")
    force_text(model, forced)
    out = model.generate(ids, mask, pixels, max_new_tokens=len(forced), stop_strings="el", **NO_STOP)
    assert out[0].tolist() == forced[:3]  # h, e, ll: "el" ends inside "ll"
    assert decode(model.tokenizer, out, "el") == ["h"]


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("one Que two Question three", ["Question"], "one Que two "),  # a false start is released
        ("a cat. " + LONG_STOP + " tail", [LONG_STOP], "a cat. "),
        ("hello there", ["el"], "h"),  # the stop string ends inside a token
        ("no stop here at all", ["Question", "Answer"], "no stop here at all"),
        ("ends with Ques", ["Question"], "ends with Ques"),  # held back, then released at the end
        ("an Answer, a Question", ["Question", "Answer"], "an "),
    ],
)
def test_stream_never_yields_a_stop_string(make_model, text, stops, expected):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS[:1])
    forced = token_ids(model.tokenizer, text)
    force_text(model, forced)
    pieces = list(stream(model, ids, mask, pixels, max_new_tokens=len(forced), stop_strings=stops, **NO_STOP))
    assert "".join(pieces) == expected
    assert all(pieces)
    force_text(model, forced)
    out = model.generate(ids, mask, pixels, max_new_tokens=len(forced), stop_strings=stops, **NO_STOP)
    assert decode(model.tokenizer, out, stops) == [expected]


def test_stream_holds_back_only_what_could_start_a_stop_string(make_model):
    model = make_model()
    ids, mask, pixels = encode(model, TEXTS[:1])
    text = "one Que two Question"
    forced = token_ids(model.tokenizer, text)
    force_text(model, forced)
    seen = ""
    for piece in stream(model, ids, mask, pixels, max_new_tokens=len(forced), stop_strings=["Question"], **NO_STOP):
        seen += piece
        assert "Q" not in seen[len("one Que") :]  # never a "Q" that might begin the stop string
    assert seen == "one Que two "
