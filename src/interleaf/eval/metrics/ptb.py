"""Penn Treebank tokenization exactly as pycocoevalcap prepares captions for CIDEr.

pycocoevalcap's ``PTBTokenizer`` writes all captions to one file, one per line, runs Stanford CoreNLP 3.4.1's
``edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` on it, and drops the tokens of its
``PUNCTUATIONS`` list. :func:`python_tokenize` reimplements that pipeline without Java: a longest-match lexer over
the token classes of CoreNLP's ``PTBLexer`` that occur in captions (words, clitics, numbers, hyphenated and slashed
compounds, abbreviations, quotes, brackets, dashes, ellipses, symbols), with JFlex's rule: the longest match wins,
trailing context counting towards its length, ties going to the earlier rule. Like the Java run, a caption's last
token can depend on how the next caption begins (``"vitamin C."`` before ``"A dog"`` loses its period), so captions
are tokenized as one document in the order pycocoevalcap writes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# pycocoevalcap drops these tokens after lowercasing, so the upper-case bracket names never match:
# "(" survives as "-lrb-", exactly as in the reference.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Line breaks other than "\n" would split a caption over two lines of the Java run (pycocoevalcap only replaces
# "\n"); both paths turn them into spaces.
_LINE_BREAKS = re.compile("[\r\n\u2028\u2029\x0b\x0c\x85]")


def clean_caption(text: str) -> str:
    """The caption as one line, the way pycocoevalcap means to write it (every line break made a space)."""
    return _LINE_BREAKS.sub(" ", text)


def _caseless(pattern: str) -> str:
    """Make a pattern's literal letters case-insensitive, as JFlex's ``%caseless`` does, leaving its character
    classes case-sensitive (``[A]rk`` matches "Ark" and "ARK", not "ark"): each literal letter becomes a class."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            step = {"u": 6, "x": 4}.get(pattern[i + 1], 2)
        elif not in_class and pattern.startswith("(?", i):
            step = 3
        elif not in_class and char.isascii() and char.isalpha():
            out.append(f"[{char.lower()}{char.upper()}]")
            i += 1
            continue
        else:
            in_class = char == "[" or (in_class and char != "]")
            step = 1
        out.append(pattern[i : i + step])
        i += step
    return "".join(out)


# --- character classes (JFlex's [:letter:] and [:digit:] are Unicode letters and decimal digits) ---
_LETTER = r"(?:[^\W\d_\u00b2\u00b3\u00b9\u00bc-\u00be\u2150-\u218f]|[\u00ad\u0300-\u036f])"
_ALNUM = rf"(?:{_LETTER}|\d)"
_SPACE = r"[ \t\u00a0\u2000-\u200a\u3000]"
_NEWLINE = r"(?:\r\n?|[\n\u2028\u2029\x0b\x0c\x85])"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = rf"(?:{_APOS}|[`\u0091\u2018\u201b])"
_HYPHEN = r"[-_\u058a\u2010\u2011]"
_SGML_NAME = r"[A-Za-z][A-Za-z0-9_:.-]*"
_SGML_ATTRIBUTE = rf"{_SGML_NAME}(?:[ ]*=[ ]*(?:'[^'\r\n]*'|\"[^\"\r\n]*\"))?"
_SGML = rf"<(?:[!?][A-Za-z-][^>\r\n]*|{_SGML_NAME}(?:[ ]+{_SGML_ATTRIBUTE})*[ ]*/?|/{_SGML_NAME})[ ]*>"

# --- token classes ---
_WORD = rf"{_LETTER}{_ALNUM}*(?:[.!?]{_LETTER}{_ALNUM}*)*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|re|ve|ll)"
_SWORD = r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
_SREDAUX = rf"n{_APOSETC}t"
_NUM = r"(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)"
_NUMBER = rf"[-+]?{_NUM}"
_ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])*|(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))"
_ACRO2 = r"[A-Za-z](?:\.[A-Za-z])+"
_THING_PREFIX = rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?"
_THING = rf"{_THING_PREFIX}{_ALNUM}+(?:{_HYPHEN}{_THING_PREFIX}{_ALNUM}+)*"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{_ACRO2}\.|[A-Za-z0-9\u00ad]+))+"
_THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
_THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
_INSENTP = r"[,;:\u3001]"

# Abbreviations (CoreNLP 3.4.1's lists, checked against its output). Upper-case letters in brackets are
# case-sensitive there: "[A]rk." is an abbreviation, "ark." is not.
_ABBREV1 = "|".join(
    [
        r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri",
        r"Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|Mich|Minn|[M]iss",
        r"Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo",
        r"Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq",
        r"Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq|etc|al|seq|Bldg",
    ]
)
_ABBREV2 = "|".join(
    [
        r"Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt",
        r"Ste?|Ave|Pres|Lieut|Rt|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr",
        r"Sfc|Sr|vs|[v]|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl|M[ft]g|Dept|Blvd|Rd",
        _ACRO,
    ]
)
_FILE_EXTENSIONS = (
    "bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql"
    "|tar|txt|wav|x|xml|zip"
)
_ABBREV3 = r"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\."
# An acronym's period also ends the sentence when one of these words follows (case-sensitive first letter).
_SENTENCE_STARTERS = [
    "About", "According", "Additionally", "After", "An", "A", "As", "At", "But", "Earlier", "He", "Her", "Here",
    "However", "If", "In", "It", "Last", "Many", "More", "Mr.", "Ms.", "Now", "Once", "One", "Other", "Our", "She",
    "Since", "So", "Some", "Such", "That", "The", "Their", "Then", "There", "These", "They", "This", "We", "When",
    "While", "What", "Yet", "You",
]  # fmt: skip
_STARTER = "|".join(f"[{word[0]}]{re.escape(word[1:])}" for word in _SENTENCE_STARTERS)

_APOWORDS = [
    rf"{_APOS}n{_APOS}?",
    rf"[lLdDjJ]{_APOS}",
    *[rf"{word}{_APOS}" for word in ("dunkin", "somethin", "ol")],
    *[rf"{_APOS}{word}" for word in ("em", "till", "til", "cause", "[2-9]0s")],
    rf"[A-HJ-XZn]{_APOSETC}{_LETTER}{{2,}}",
    rf"{_LETTER}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_LETTER}*",
    *[
        re.escape(word)
        for word in ("cont'd.", "cont'd", "nor'easter", "c'mon", "e'er", "s'mores", "ev'ry", "li'l", "nat'l")
    ],
]

_MISC_SYMBOL = (
    "+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7\u0387"
    "\u2016\u2017\u2020-\u2025\u2030-\u2038\u203b\u203c\u2043\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e"
    "\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3001-\u3006\u3008-\u3020\u30fb\uff01-\uff0f\uff1a-\uff20"
    "\uff3b-\uff40\uff5b-\uff65"
)

# --- what a rule does with its text: (token or None, characters consumed) ---
Action = Callable[[str], tuple[str | None, int]]


def _keep(text: str) -> tuple[str | None, int]:
    return text, len(text)


def _unhyphenated(text: str) -> tuple[str | None, int]:
    """Soft hyphens (U+00AD) only mark where a word may break; they are dropped."""
    return text.replace("\u00ad", ""), len(text)


def _skip(text: str) -> tuple[str | None, int]:
    return None, len(text)


def _newline(text: str) -> tuple[str | None, int]:
    return "\n", len(text)


def _as(token: str) -> Action:
    return lambda text: (token, len(text))


def _split_after(n: int) -> Action:
    """Emit the first ``n`` characters; the rest is lexed again ("cannot" -> "can" "not")."""
    return lambda text: (text[:n], n)


def _split_before(n: int) -> Action:
    """Emit all but the last ``n`` characters ("gonna" -> "gon" "na")."""
    return lambda text: (text[:-n], len(text) - n)


def _repeat_period(text: str) -> tuple[str | None, int]:
    """An abbreviation that ends a sentence: its period is also the sentence's ("Inc." -> "Inc." ".")."""
    return text, len(text) - 1


def _acronym_before_sentence(text: str) -> tuple[str | None, int]:
    """A sentence-final acronym: a single letter loses its period ("C." -> "C" "."), longer ones repeat it."""
    return (text[0], 1) if len(text) == 2 else _repeat_period(text)


def _nbsp(text: str) -> tuple[str | None, int]:
    return text.replace(" ", "\u00a0"), len(text)


def _phone(text: str) -> tuple[str | None, int]:
    return text.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-"), len(text)


def _smiley(text: str) -> tuple[str | None, int]:
    return text.replace("(", "-LRB-").replace(")", "-RRB-"), len(text)


def _amp(text: str) -> tuple[str | None, int]:
    return re.sub("(?i)&amp;", "&", text), len(text)


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _currency(text: str) -> tuple[str | None, int]:
    return _CURRENCY.get(text, text), len(text)


def _fraction(text: str) -> tuple[str | None, int]:
    return _FRACTIONS.get(text, text), len(text)


_LEFT_SINGLE = re.compile("[\u0091\u2018\u201b\u2039]")
_RIGHT_SINGLE = re.compile("[\u0092\u2019\u203a]")
_LEFT_DOUBLE = re.compile("[\u0093\u201c\u00ab]")
_RIGHT_DOUBLE = re.compile("[\u0094\u201d\u00bb]")


def _quote(left: bool) -> Action:
    """LaTeX-style quotes: ``"`` becomes ````` or ``''`` and ``'`` becomes ``\\``` or ``'`` by side."""

    def normalize(text: str) -> tuple[str | None, int]:
        out = re.sub("&apos;|'", "`" if left else "'", text)
        out = re.sub('"|&quot;', "``" if left else "''", out)
        out = _LEFT_SINGLE.sub("`", out)
        out = _RIGHT_SINGLE.sub("'", out)
        out = _LEFT_DOUBLE.sub("``", out)
        return _RIGHT_DOUBLE.sub("''", out), len(text)

    return normalize


def _dashes(text: str) -> tuple[str | None, int]:
    return ("--" if 3 <= len(text) <= 4 else text), len(text)


# (token pattern, trailing context or None, action), in the order of CoreNLP's rules: ties go to the earlier.
_RULE_TABLE: list[tuple[str, str | None, Action]] = [
    (r"c\+\+|(?:c|f)#", None, _keep),
    ("cannot", None, _split_after(3)),
    (f"{_APOS}twas", None, _split_after(2)),
    (f"{_APOS}tis|gonna|gotta|lemme|gimme|wanna", None, _split_before(2)),
    (_SGML, None, _nbsp),
    (r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _as("--")),
    ("&amp;", None, _amp),
    (r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", None, _keep),
    (_WORD, _REDAUX, _unhyphenated),
    (_SWORD, _SREDAUX, _unhyphenated),
    (_WORD, None, _unhyphenated),
    *[(apoword, None, _keep) for apoword in _APOWORDS],
    (rf"y{_APOS}", _LETTER, _keep),
    (r"https?://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]", None, _keep),
    (
        r"(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
        r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?:com|net|org|edu))"
        r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?",
        None,
        _keep,
    ),
    (
        r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*"
        r"[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:&gt;|>)?",
        None,
        _keep,
    ),
    (r"@[a-zA-Z_][a-zA-Z_0-9]*", None, _keep),
    (rf"#{_LETTER}+", None, _keep),
    (_REDAUX, r"[^A-Za-z]", _quote(left=False)),
    (_SREDAUX, None, _quote(left=False)),
    (r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", None, _keep),
    (_NUMBER, None, _unhyphenated),
    (r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", None, _keep),
    (r"(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", None, _nbsp),
    (r"[\u00bc\u00bd\u00be\u2153-\u215e]", None, _fraction),
    (
        rf"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{_APOS}n|c{_APOS}est",
        None,
        _amp,
    ),
    (_THING3, None, _keep),
    (r"[A-Z]*\$|#", None, _keep),
    ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", None, _currency),
    (rf"{_ACRO}\.", rf"{_SPACENL}+(?:{_STARTER}|{_SGML}){_SPACENL}", _acronym_before_sentence),
    (_ABBREV3, rf"{_SPACENL}?\d", _keep),
    (r"(?:so|no)\.", rf"{_SPACENL}+(?:africa|korea|cal)", _keep),
    (r"(?:pt[ey]|co)\.", rf"{_SPACE}(?:ltd|lim)", _keep),
    (rf"(?:{_ABBREV1})\.", rf"{_SPACENL}(?:{_SPACENL}|[A-Z]|{_SGML})", _repeat_period),
    (rf"(?:{_ABBREV1})\.", r"[\s\S]{2}", _keep),
    (rf"(?:{_ABBREV1})\.", None, _repeat_period),
    (rf"(?:{_ABBREV2})\.", None, _keep),
    (rf"{_APOS}[0-9][0-9]", _SPACENL, _keep),
    (rf"{_ALNUM}+(?:\.{_ALNUM}+)*\.(?:{_FILE_EXTENSIONS})", rf"{_SPACENL}|[.?!,\"'<]", _keep),
    (rf"{_WORD}\.", _INSENTP, _unhyphenated),
    (r"(?:\([0-9]{3}\)[ \u00a0]?|[0-9]{3}[- \u00a0.])[0-9]{3}[- \u00a0.][0-9]{4}", None, _phone),
    ('"|&quot;', r"[A-Za-z0-9$]", _quote(left=True)),
    ('"|&quot;', None, _quote(left=False)),
    ("<|&lt;", None, _as("<")),
    (">|&gt;", None, _as(">")),
    (r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", r"[^A-Za-z0-9]", _smiley),
    (r"[-^x=~<>']_[-^x=~<>']|\([-^x=~<>'][_.]?[-^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)", None, _smiley),
    (r"\{", None, _as("-LCB-")),
    (r"\}", None, _as("-RCB-")),
    (r"\[", None, _as("-LSB-")),
    (r"\]", None, _as("-RSB-")),
    (r"\(", None, _as("-LRB-")),
    (r"\)", None, _as("-RRB-")),
    (r"-+", None, _dashes),
    (r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\u0085\u2026]", None, _as("...")),
    (r"@+|#+|_+", None, _keep),
    (r"\*+|(?:\\\*){1,3}", None, _keep),
    (_INSENTP, None, _keep),
    (r"[?!]+", None, _keep),
    ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa]", None, _keep),
    ("=", None, _keep),
    ("/", None, _keep),
    (rf"{_HTHING}\.", _INSENTP, _unhyphenated),
    (_HTHING, None, _unhyphenated),
    (rf"{_THING}\.", _INSENTP, _keep),
    (_THING, None, _keep),
    (rf"{_THINGA}\.", _INSENTP, _amp),
    (_THINGA, None, _amp),
    ("'", r"[A-Za-z][^ \t\n\r\u00a0]", _quote(left=True)),
    (_REDAUX, None, _quote(left=False)),
    (rf"''|[`\u2018-\u201f\u0091-\u0094\u2039\u203a\u00ab\u00bb]{{1,2}}|{_APOS}", None, _quote(left=False)),
    ("<<|>>", None, _keep),
    (f"[{_MISC_SYMBOL}]", None, _keep),
    (rf"\x00|{_SPACE}+|[\u200b\u200e\u200f\ufeff]|&nbsp;", None, _skip),
    (_NEWLINE, None, _newline),
]
_RULES = [
    (re.compile(_caseless(f"({token})" + (f"(?=({context}))" if context else ""))), action)
    for token, context, action in _RULE_TABLE
]


# A plain word before white space, alone or with one of ",;:!?", can only be lexed as itself (or, for these, split):
# a shortcut for speed.
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[,;:!?]?(?:[ \t\n]|\Z))")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _next_token(text: str, pos: int) -> tuple[str | None, int]:
    """The longest match at ``pos`` (trailing context included), earliest rule on ties; unknown characters vanish."""
    if text[pos] in " \t":
        return None, 1
    plain = _PLAIN_WORD.match(text, pos)
    if plain and plain.group().lower() not in _SPLIT_WORDS:
        return plain.group(), plain.end() - pos
    best_length, best = 0, None
    for pattern, action in _RULES:
        match = pattern.match(text, pos)
        if match is None:
            continue
        length = match.end(1) - pos + (len(match.group(2)) if match.lastindex == 2 else 0)
        if length > best_length:
            best_length, best = length, (match.group(1), action)
    if best is None:
        return None, 1
    return best[1](best[0])


def _lex(document: str) -> list[list[str]]:
    """Tokens of each line of ``document``, lower-cased, as ``PTBTokenizer -preserveLines -lowerCase`` prints them."""
    lines: list[list[str]] = [[]]
    pos = 0
    while pos < len(document):
        token, consumed = _next_token(document, pos)
        pos += consumed
        if token == "\n":
            lines.append([])
        elif token:
            lines[-1].append(token.lower())
    return lines


def python_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenize captions like pycocoevalcap's ``PTBTokenizer`` (CoreNLP 3.4.1 + punctuation removal), in pure Python.

    Captions are lexed as one document, one caption a line and in the given order, as pycocoevalcap writes them.
    Returns one string per caption: lower-cased tokens joined by single spaces, punctuation tokens removed.
    """
    lines = _lex("\n".join(clean_caption(caption) for caption in captions))
    return [" ".join(token for token in tokens if token not in PUNCTUATIONS) for tokens in lines]
