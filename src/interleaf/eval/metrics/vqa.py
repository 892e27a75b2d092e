"""VQA accuracy exactly as the official VQA evaluation computes it (``vqaEval.py`` of the VQA API), and the
OK-VQA answer stemming that OpenFlamingo applies to its generations.

A prediction scores, against each of the 10 leave-one-out subsets of 9 human answers, ``min(#matches / 3, 1)``;
the accuracy is the mean of the 10. Answers are compared after the official normalisation: punctuation removed or
made a space (commas between digits vanish: "1,000" -> "1000"), periods dropped unless a digit follows, lower case,
number words made digits ("two" -> "2"), articles dropped, missing apostrophes restored ("dont" -> "don't").

Two conventions exist and both are reproduced:

- ``"vqa"``: the official API (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``): the
  prediction is always normalised; the human answers only have their punctuation processed, and only when they
  are not all the same.
- ``"open_flamingo"``: OpenFlamingo's copy (``open_flamingo/eval/vqa_metric.py``), used for its published
  numbers: answers and prediction are stripped; when the answers are not all the same, both are fully normalised,
  otherwise neither is.

Both report ``round(100 * accuracy, 2)``; these functions return the unrounded fraction.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Literal, TypeVar

from interleaf.extras import MissingExtra

Key = TypeVar("Key", bound=Hashable)
Convention = Literal["vqa", "open_flamingo"]

# Reference tables of vqaEval.py (facts, restated).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset(["a", "an", "the"])
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The reference pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (vacuous) look-ahead, not a look-behind, so
# a period is dropped whenever no digit follows it. The reference passes re.UNICODE (32) where `sub` takes its
# count, so at most 32 periods go.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: each mark is deleted if it touches a space in the input (or the input has a
    digit-comma-digit anywhere), else replaced by a space; then periods not followed by a digit are removed."""
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or glued else " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lower case, number words to digits, articles dropped, contractions fixed."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The full official normalisation of one answer (line breaks and tabs to spaces, strip, punctuation, words)."""
    return process_digit_article(process_punctuation(_strip(text)))


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the subsets that leave one human answer out of ``min(1, matches in the rest / 3)``."""
    matches = sum(answer == prediction for answer in answers)
    per_subset = [min(1.0, (matches - (answer == prediction)) / 3) for answer in answers]
    return sum(per_subset) / len(per_subset)


def _official(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    return normalize_answer(prediction), list(answers)


def _open_flamingo(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    answers, prediction = [_strip(answer) for answer in answers], _strip(prediction)
    if len(set(answers)) > 1:
        return normalize_answer(prediction), [normalize_answer(answer) for answer in answers]
    return prediction, answers


_CONVENTIONS: dict[str, Callable[[str, Sequence[str]], tuple[str, list[str]]]] = {
    "vqa": _official,
    "open_flamingo": _open_flamingo,
}


def vqa_accuracy(prediction: str, answers: Sequence[str], *, convention: Convention = "vqa") -> float:
    """VQA accuracy of one prediction against its human answers (10 in VQAv2, OK-VQA, VizWiz and TextVQA).

    ``convention`` picks which reference to reproduce: ``"vqa"`` (the official VQA API) or ``"open_flamingo"``
    (OpenFlamingo's evaluation); see the module docstring for how they differ.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError("answers must be a non-empty list of human answers")
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(_CONVENTIONS)}, not {convention!r}")
    return _leave_one_out(*_CONVENTIONS[convention](prediction, answers))


def vqa_corpus_accuracy(
    predictions: Mapping[Key, str], answers: Mapping[Key, Sequence[str]], *, convention: Convention = "vqa"
) -> float:
    """Mean :func:`vqa_accuracy` over questions (``VQAEval.accuracy["overall"]`` is ``round(100 * this, 2)``)."""
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [key for key in predictions if key not in answers]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no answers, e.g. question ids {missing[:3]}")
    scores = [vqa_accuracy(predictions[key], answers[key], convention=convention) for key in predictions]
    return sum(scores) / len(scores)


# OK-VQA: OpenFlamingo (open_flamingo/eval/ok_vqa_utils.py) stems generations to match the stemmed answers of
# OK-VQA v1.1. Words in this table map as listed (found by comparing the dataset's raw and stemmed answers); other
# words ending in "ing" are lemmatized as verbs by WordNet, and plural nouns (POS tag NNS or NNPS) singularized.
OKVQA_MANUAL_STEMS = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean", "hell's": "hell",
    "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are", "riding": "ride", "leaves": "leaf",
    "dangerous": "danger", "clothing": "cloth", "texting": "text", "kiting": "kite", "firefighters": "firefight",
    "ties": "tie", "married": "married", "teething": "teeth", "gloves": "glove", "tennis": "tennis",
    "dining": "dine", "directions": "direct", "waves": "wave", "christmas": "christmas", "drives": "drive",
    "pudding": "pud", "coding": "code", "plating": "plate", "quantas": "quanta", "hornes": "horn", "graves": "grave",
    "mating": "mate", "paned": "pane", "alertness": "alert", "sunbathing": "sunbath", "tenning": "ten",
    "wetness": "wet", "urinating": "urine", "sickness": "sick", "braves": "brave", "firefighting": "firefight",
    "lenses": "lens", "reflections": "reflect", "backpackers": "backpack", "eatting": "eat", "designers": "design",
    "curiousity": "curious", "playfulness": "play", "blindness": "blind", "hawke": "hawk", "tomatoe": "tomato",
    "rodeoing": "rodeo", "brightness": "bright", "circuses": "circus", "skateboarders": "skateboard",
    "staring": "stare", "electronics": "electron", "electicity": "elect", "mountainous": "mountain",
    "socializing": "social", "hamburgers": "hamburg", "caves": "cave", "transitions": "transit", "wading": "wade",
    "creame": "cream", "toileting": "toilet", "sautee": "saute", "buildings": "build", "belongings": "belong",
    "stockings": "stock", "walle": "wall", "cumulis": "cumuli", "travelers": "travel", "conducter": "conduct",
    "browsing": "brows", "pooping": "poop", "haircutting": "haircut", "toppings": "top", "hearding": "heard",
    "sunblocker": "sunblock", "bases": "base", "markings": "mark", "mopeds": "mope",
    "kindergartener": "kindergarten", "pies": "pie", "scrapbooking": "scrapbook", "couponing": "coupon",
    "meetings": "meet", "elevators": "elev", "lowes": "low", "men's": "men", "childrens": "children",
    "shelves": "shelve", "paintings": "paint", "raines": "rain", "paring": "pare", "expressions": "express",
    "routes": "rout", "pease": "peas", "vastness": "vast", "awning": "awn", "boy's": "boy", "drunkenness": "drunken",
    "teasing": "teas", "conferences": "confer", "ripeness": "ripe", "suspenders": "suspend", "earnings": "earn",
    "reporters": "report", "kid's": "kid", "containers": "contain", "corgie": "corgi", "porche": "porch",
    "microwaves": "microwave", "batter's": "batter", "sadness": "sad", "apartments": "apart", "oxygenize": "oxygen",
    "striping": "stripe", "purring": "pure", "professionals": "profession", "piping": "pipe", "farmer's": "farmer",
    "potatoe": "potato", "emirates": "emir", "womens": "women", "veteran's": "veteran", "wilderness": "wilder",
    "propellers": "propel", "alpes": "alp", "charioteering": "chariot", "swining": "swine", "illness": "ill",
    "crepte": "crept", "adhesives": "adhesive", "regent's": "regent", "decorations": "decor", "rabbies": "rabbi",
    "overseas": "oversea", "travellers": "travel", "casings": "case", "smugness": "smug", "doves": "dove",
    "nationals": "nation", "mustange": "mustang", "ringe": "ring", "gondoliere": "gondolier",
    "vacationing": "vacate", "reminders": "remind", "baldness": "bald", "settings": "set", "glaced": "glace",
    "coniferous": "conifer", "revelations": "revel", "personals": "person", "daughter's": "daughter",
    "badness": "bad", "projections": "project", "polarizing": "polar", "vandalizers": "vandal", "minerals": "miner",
    "protesters": "protest", "controllers": "control", "weddings": "wed", "sometimes": "sometime", "earing": "ear",
}  # fmt: skip

_OKVQA_SETUP = (
    "OK-VQA stemming needs `pip install 'interleaf[okvqa]'` (nltk, inflection) and NLTK's data: "
    "python -c \"import nltk; [nltk.download(p) for p in ('punkt', 'punkt_tab', 'averaged_perceptron_tagger', "
    "'averaged_perceptron_tagger_eng', 'wordnet')]\""
)


def stem_tagged_words(
    tagged: Iterable[tuple[str, str]], lemmatize_verb: Callable[[str], str], singularize: Callable[[str], str]
) -> str:
    """The OK-VQA stemming rule on (word, POS tag) pairs: manual table, then ``-ing`` verbs, then plural nouns."""
    stems = []
    for word, tag in tagged:
        if word in OKVQA_MANUAL_STEMS:
            word = OKVQA_MANUAL_STEMS[word]
        elif word.endswith("ing"):
            word = lemmatize_verb(word)
        elif tag.startswith(("NNS", "NNPS")):
            word = singularize(word)
        stems.append(word)
    return " ".join(stems)


def okvqa_stem(text: str) -> str:
    """OpenFlamingo's ``OKVQAStemmer.stem``: NLTK word tokens and POS tags, WordNet verb lemmas, ``inflection``
    singulars. Score OK-VQA as ``vqa_accuracy(okvqa_stem(prediction), answers)``."""
    try:
        import inflection
        import nltk
    except ImportError:
        raise MissingExtra(_OKVQA_SETUP) from None
    lemmatizer = nltk.stem.WordNetLemmatizer()
    try:
        tagged = nltk.pos_tag(nltk.tokenize.word_tokenize(text))
        return stem_tagged_words(tagged, lambda word: lemmatizer.lemmatize(word, "v"), inflection.singularize)
    except LookupError as error:
        raise LookupError(_OKVQA_SETUP) from error
