"""Special tokens: adding them to a tokenizer once, and resolving their ids."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken

from interleaf.config import TokensConfig


@dataclass(frozen=True, kw_only=True)
class TokenIds:
    image: int
    end_of_chunk: int | None
    pad: int
    eos: int | None
    begin_of_image: int | None = None


def prepare_tokenizer(tokenizer, tokens: TokensConfig) -> tuple[str, ...]:
    """Add the special tokens the tokenizer lacks; return those added, in id order.

    ``<image>`` and ``<|endofchunk|>`` (and any ``tokens.extra``) become additional special
    tokens; a pad token is added only when the tokenizer has none. ``tokens.begin_of_image``
    comes last, so that a text-only model's tokens keep their ids when it learns to draw.
    """
    before = len(tokenizer)
    add_special_tokens(tokenizer, [t for t in (tokens.image, tokens.end_of_chunk, *tokens.extra) if t is not None])
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": tokens.pad})
    if tokens.begin_of_image:
        add_special_tokens(tokenizer, [tokens.begin_of_image])
    added = sorted((t for t, i in tokenizer.get_vocab().items() if i >= before), key=tokenizer.convert_tokens_to_ids)
    return tuple(added)


def add_special_tokens(tokenizer, tokens) -> None:
    """Add those of ``tokens`` the tokenizer lacks, in order, as special tokens."""
    vocab = tokenizer.get_vocab()
    missing = [AddedToken(t, special=True, normalized=False) for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)


def token_ids(tokenizer, tokens: TokensConfig) -> TokenIds:
    vocab = tokenizer.get_vocab()
    for name in (tokens.image, tokens.end_of_chunk, tokens.begin_of_image):
        if name is not None and name not in vocab:
            raise ValueError(f"the tokenizer has no {name!r} token; build the processor with prepare_tokenizer")
    return TokenIds(
        image=vocab[tokens.image],
        end_of_chunk=vocab[tokens.end_of_chunk] if tokens.end_of_chunk is not None else None,
        pad=tokenizer.pad_token_id,
        eos=tokenizer.eos_token_id,
        begin_of_image=vocab[tokens.begin_of_image] if tokens.begin_of_image else None,
    )


def special_prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when it adds its special tokens (its BOS, for
    most; nothing for GPT-2 or Qwen): training sequences and prompts both start with these."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []


def special_prefix(tokenizer) -> str:
    """:func:`special_prefix_ids` as text (``"<s>"``), which the tokenizer reads back as those ids."""
    return "".join(tokenizer.convert_ids_to_tokens(special_prefix_ids(tokenizer)))
