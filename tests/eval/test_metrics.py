"""Metrics equal the references: CIDEr (pycocoevalcap, Java PTB tokenizer), VQA accuracy (official VQA API and
OpenFlamingo's copy), ROC AUC / top-1 / multiple choice. Java-dependent parity tests skip where Java is missing."""

import json
import math
from pathlib import Path

import pytest

from interleaf.eval.metrics import (
    cider,
    cider_d,
    cider_scores,
    java_tokenizer_available,
    multiple_choice_accuracy,
    normalize_answer,
    okvqa_stem,
    ptb_tokenize,
    python_tokenize,
    roc_auc,
    top1_accuracy,
    vqa_accuracy,
    vqa_corpus_accuracy,
)
from interleaf.eval.metrics.vqa import process_punctuation, stem_tagged_words
from interleaf.extras import MissingExtra

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "coco_captions.json").read_text(encoding="utf-8"))
PREDICTIONS = {item["image_id"]: item["prediction"] for item in FIXTURE}
REFERENCES = {item["image_id"]: item["references"] for item in FIXTURE}
ALL_CAPTIONS = [caption for item in FIXTURE for caption in [item["prediction"], *item["references"]]]

needs_java = pytest.mark.skipif(
    not java_tokenizer_available(),
    reason="parity with pycocoevalcap's Java PTB tokenizer needs `pip install pycocoevalcap` and a `java` on PATH",
)


# --- PTB tokenization -------------------------------------------------------------------------------------------


# Expected strings were produced by pycocoevalcap 1.2's PTBTokenizer (CoreNLP 3.4.1) and checked by hand.
TOKENIZED = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("It's the dog's toy; don't (really) go!", "it 's the dog 's toy do n't -lrb- really -rrb- go"),
    (
        "A black-and-white photo of a 1950's car, parked near St. Mark's church.",
        "a black-and-white photo of a 1950 's car parked near st. mark 's church",
    ),
    ("Two people cannot wanna go", "two people can not wan na go"),
    ('"Stop" sign at the U.S. border', "stop sign at the u.s. border"),
    ("It costs $5 -- 50% off.", "it costs $ 5 50 % off"),
    ("Add 5 1/2 cups of flour...", "add 5\u00a01/2 cups of flour"),
    ("A  cat\tsitting   on a mat ", "a cat sitting on a mat"),
    ("The clock reads 10:30 a.m. and 1,000 people are there.", "the clock reads 10:30 a.m. and 1,000 people are there"),
    ("a grey T-shirt, e.g. this one", "a grey t-shirt e.g. this one"),
    ("rock 'n' roll at 3 o'clock", "rock 'n' roll at 3 o'clock"),
    ("I'm sure they're here, aren't they?", "i 'm sure they 're here are n't they"),
    ("A café with “smart quotes” — and an ellipsis…", "a café with smart quotes and an ellipsis"),
    ("two lines\nin one caption", "two lines in one caption"),
]


@pytest.mark.parametrize(("caption", "expected"), TOKENIZED)
def test_python_tokenizer_hand_checked(caption, expected):
    assert python_tokenize([caption]) == [expected]


def test_python_tokenizer_sees_the_next_caption_like_the_java_run():
    # CoreNLP ends a sentence after a one-letter acronym when the next line starts like a sentence ("A ...").
    assert python_tokenize(["vitamin C.", "A dog", "vitamin C.", "a dog"]) == [
        "vitamin c",
        "a dog",
        "vitamin c.",
        "a dog",
    ]


@pytest.fixture(scope="module")
def java_tokens() -> list[str]:
    """pycocoevalcap's Java tokenization of the fixture and the hand-checked captions, in one JVM run."""
    return ptb_tokenize(ALL_CAPTIONS + [caption for caption, _ in TOKENIZED], tokenizer="java")


@needs_java
def test_python_tokenizer_equals_java(java_tokens):
    assert python_tokenize(ALL_CAPTIONS + [caption for caption, _ in TOKENIZED]) == java_tokens
    assert java_tokens[len(ALL_CAPTIONS) :] == [expected for _, expected in TOKENIZED]


def test_java_tokenizer_required_but_missing(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(MissingExtra, match=r"java.*pip install 'interleaf\[eval\]'"):
        ptb_tokenize(["a dog"], tokenizer="java")
    assert ptb_tokenize(["A dog."], tokenizer="auto") == ["a dog"]
    with pytest.raises(ValueError, match="tokenizer"):
        ptb_tokenize(["a dog"], tokenizer="perl")


# --- CIDEr-D ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def java_cider() -> dict[int, float]:
    """pycocoevalcap end to end (Java tokenizer, its Cider scorer) on the fixture: two JVM runs."""
    return cider_scores(PREDICTIONS, REFERENCES, tokenizer="java")


@needs_java
def test_cider_python_equals_pycocoevalcap_on_fixture(java_cider):
    ours = cider_scores(PREDICTIONS, REFERENCES, tokenizer="python")
    assert list(ours) == list(java_cider)
    for key, score in java_cider.items():
        assert ours[key] == pytest.approx(score, abs=1e-9, rel=0)
    reference_corpus = sum(java_cider.values()) / len(java_cider)
    assert cider(PREDICTIONS, REFERENCES, tokenizer="python") == pytest.approx(reference_corpus, abs=1e-9, rel=0)
    assert reference_corpus > 1.0  # the fixture's predictions are close to their references


def test_cider_d_equals_pycocoevalcap_scorer_on_tokenized_captions():
    scorer = pytest.importorskip("pycocoevalcap.cider.cider", reason="pycocoevalcap not installed")
    hypotheses = python_tokenize(list(PREDICTIONS.values()))
    references = [python_tokenize(refs) for refs in REFERENCES.values()]
    _, expected = scorer.Cider().compute_score(dict(enumerate(references)), {i: [h] for i, h in enumerate(hypotheses)})
    assert cider_d(hypotheses, references) == pytest.approx(list(expected), abs=1e-12, rel=0)


def test_cider_hand_computed():
    # Two images; every n-gram occurs in the references of one image only, so each weight is ln(2) and cancels.
    # Image 1: hypothesis "a b" vs reference "a b c": 1-grams 2/sqrt(2*3), 2-grams 1/sqrt(1*2), no 3- or 4-grams;
    # lengths (counted in bigrams, as pycocoevalcap does) 1 vs 2 give the penalty exp(-1 / (2 * 6**2)).
    # Image 2: identical two-word captions: 1- and 2-gram cosines 1, so (1 + 1 + 0 + 0) / 4 * 10 = 5.
    scores = cider_scores({1: "a b", 2: "d e"}, {1: ["a b c"], 2: ["d e"]}, tokenizer="python")
    image1 = (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert scores == pytest.approx({1: image1, 2: 5.0}, abs=1e-12)
    assert cider({1: "a b", 2: "d e"}, {1: ["a b c"], 2: ["d e"]}, tokenizer="python") == pytest.approx(
        (image1 + 5) / 2
    )


def test_cider_idf_spans_all_references():
    # "a" appears in the references of both images: IDF log(2/2) = 0, so matching only "a" scores nothing.
    scores = cider_scores({1: "a c", 2: "a b"}, {1: ["a b"], 2: ["a c"]}, tokenizer="python")
    assert scores == {1: 0.0, 2: 0.0}
    # A lone image has IDF log(1/1) = 0 for every n-gram: CIDEr 0 even for a perfect caption, as in the reference.
    assert cider({1: "a dog"}, {1: ["a dog"]}, tokenizer="python") == 0.0


def test_cider_averages_references_and_clips_repeats():
    refs = {1: ["a dog runs", "a cat sleeps"], 2: ["the sun", "the moon"]}
    one_ref = cider_scores({1: "a dog runs", 2: "the sun"}, refs, tokenizer="python")[1]
    repeated = cider_scores({1: "a dog runs dog dog", 2: "the sun"}, refs, tokenizer="python")[1]
    assert 0 < repeated < one_ref < 10


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({}, {}, "no predictions"),
        ({1: "a"}, {2: ["a"]}, "same ids"),
        ({1: "a", 2: "b"}, {1: ["a"]}, "same ids"),
        ({1: "a"}, {1: []}, "no reference"),
    ],
)
def test_cider_rejects_bad_inputs(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        cider(predictions, references, tokenizer="python")


def test_cider_d_rejects_bad_inputs():
    for hypotheses, references in (([], []), (["a"], [["a"], ["b"]]), (["a"], [[]])):
        with pytest.raises(ValueError, match="one hypothesis"):
            cider_d(hypotheses, references)


# --- VQA accuracy -------------------------------------------------------------------------------------------------


def leave_one_out_by_hand(matches: int, total: int = 10) -> float:
    """Each of the `matches` annotators left out leaves matches-1 others; each of the rest leaves `matches`."""
    return (matches * min(1, (matches - 1) / 3) + (total - matches) * min(1, matches / 3)) / total


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out(matches, expected):
    answers = ["cat"] * matches + ["dog", "bird", "cow", "horse", "sheep", "goat", "pig", "fox", "owl", "bee"][matches:]
    assert leave_one_out_by_hand(matches) == pytest.approx(expected)
    for convention in ("vqa", "open_flamingo"):
        assert vqa_accuracy("cat", answers, convention=convention) == pytest.approx(expected)


def test_two_of_ten_is_point_six():
    # 2 of 10 annotators said "red": leaving out one of them leaves 1 match (1/3), leaving out any of the other 8
    # leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    answers = ["red", "red"] + ["blue"] * 5 + ["green"] * 3
    assert vqa_accuracy("red", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10) == pytest.approx(0.6)


# Published examples of the normalisation (visualqa.org/evaluation.html) and hand-checked cases.
NORMALIZED = [
    ("dont", "don't"),  # contraction missing its apostrophe
    ("100,978", "100978"),  # no space for a comma between digits
    ("girl's", "girl's"),  # apostrophes kept
    ("2:50 pm", "2:50 pm"),  # colons kept
    ("Two", "2"),
    ("two dogs", "2 dogs"),
    ("none", "0"),
    ("the dog", "dog"),
    ("A Cat.", "cat"),
    ("yes.", "yes"),
    ("yes!", "yes"),
    ("3.5", "3.5"),
    ("red,white", "red white"),
    ("red, white", "red white"),
    ("black-and-white", "black and white"),
    ("1,000 - 2,000", "1000 2000"),
    ("  Yes\n", "yes"),
]


@pytest.mark.parametrize(("answer", "expected"), NORMALIZED)
def test_vqa_normalization(answer, expected):
    assert normalize_answer(answer) == expected


def test_vqa_period_quirk():
    # The reference passes re.UNICODE (32) as `sub`'s count: at most 32 periods are removed.
    assert process_punctuation("." * 40) == "." * 8


def test_vqa_normalization_in_scoring():
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("the dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 9 + ["no"]) == 1.0


def test_vqa_conventions_differ_where_the_references_do():
    # Unanimous answers: the official API still normalises the prediction, OpenFlamingo's copy normalises nothing.
    assert vqa_accuracy("Yes.", ["yes"] * 10, convention="vqa") == 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10, convention="open_flamingo") == 0.0
    # Mixed answers: the official API only strips punctuation from the human answers ("two" stays), OpenFlamingo's
    # copy normalises them too ("two" -> "2").
    answers = ["two"] * 3 + ["three"] * 7
    assert vqa_accuracy("2", answers, convention="vqa") == 0.0
    assert vqa_accuracy("2", answers, convention="open_flamingo") == pytest.approx(0.9)


def test_vqa_corpus_accuracy():
    predictions = {1: "yes", 2: "red", 3: "two"}
    answers = {1: ["yes"] * 10, 2: ["red", "red"] + ["blue"] * 8, 3: ["4"] * 10}
    assert vqa_corpus_accuracy(predictions, answers) == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    with pytest.raises(ValueError, match="no answers"):
        vqa_corpus_accuracy({1: "yes", 9: "no"}, answers)
    with pytest.raises(ValueError, match="no predictions"):
        vqa_corpus_accuracy({}, answers)


def test_vqa_rejects_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(ValueError, match="convention"):
        vqa_accuracy("yes", ["yes"], convention="lavis")


def test_okvqa_stemming_rule():
    tagged = [("riding", "VBG"), ("horses", "NNS"), ("running", "VBG"), ("leaves", "NNS"), ("dogs", "NN")]
    stem = stem_tagged_words(tagged, lemmatize_verb={"running": "run"}.get, singularize=lambda word: word[:-1])
    # the manual table wins ("riding", "leaves"), then "-ing" verbs, then plural-noun tags; "dogs" tagged NN stays.
    assert stem == "ride horse run leaf dogs"


def test_okvqa_stem_with_nltk():
    nltk = pytest.importorskip("nltk", reason="OK-VQA stemming needs nltk")
    pytest.importorskip("inflection", reason="OK-VQA stemming needs inflection")
    try:
        assert okvqa_stem("riding horses") == "ride horse"
    except LookupError:
        pytest.skip(f"NLTK data (punkt, averaged_perceptron_tagger, wordnet) not installed for nltk {nltk.__version__}")


# --- classification -----------------------------------------------------------------------------------------------


def test_roc_auc():
    pytest.importorskip("sklearn", reason="roc_auc needs scikit-learn")
    # scikit-learn's documented example.
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.9, 0.1], [True, False]) == 1.0


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [([0.1, 0.2], [0, 1, 1], "differ in length"), ([0.1, 0.2], [1, 1], "both classes"), ([0.1], [2], "0 or 1"),
     ([], [], "no scores")],
)  # fmt: skip
def test_roc_auc_rejects_bad_inputs(scores, labels, message):
    pytest.importorskip("sklearn", reason="roc_auc needs scikit-learn")
    with pytest.raises(ValueError, match=message):
        roc_auc(scores, labels)


def test_top1_accuracy():
    scores = [[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.2, 0.3, 0.9]]
    assert top1_accuracy(scores, [1, 1, 2]) == pytest.approx(2 / 3)  # the tie goes to class 0
    with pytest.raises(ValueError, match="differ in length"):
        top1_accuracy(scores, [1, 1])
    with pytest.raises(ValueError, match="class indices"):
        top1_accuracy(scores, [1, 1, 3])
    with pytest.raises(ValueError, match="matrix"):
        top1_accuracy([0.1, 0.2], [0, 1])


def test_multiple_choice_accuracy():
    assert multiple_choice_accuracy([[0.1, 0.9], [0.3, 0.2, 0.5, 0.0], [2.0, 1.0]], [1, 2, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not among its 2 choices"):
        multiple_choice_accuracy([[0.1, 0.9]], [2])
    with pytest.raises(ValueError, match="no choice_scores"):
        multiple_choice_accuracy([], [])
