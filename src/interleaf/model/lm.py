"""Language-model adapter: cross-attention inserted into any HF causal LM, and the
embeddings of the tokens the LM does not know.

The decoder-layer list is found (or named by ``LMConfig.layers_path``) and selected layers
are replaced by a :class:`CrossAttentionDecoderLayer` that owns the original layer and a
gated cross-attention block. No ``__class__`` is swapped and no layer stores image
features: the media of one call reach the blocks as a keyword argument of the LM's forward
(llama, mistral, qwen2, gpt2, gpt_neox, opt, ... pass ``**kwargs`` down to every layer), and,
for LMs that drop extra keywords on the way (MPT), through a context variable set for
exactly the duration of that call. The keyword wins where both arrive: it survives
activation-checkpoint recomputation, which runs outside the call (for the context-variable
route, :func:`checkpoint_contexts` re-enters the call's media around the recomputation).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from interleaf.model.xattn import GatedCrossAttentionBlock, MediaKV


@dataclass(frozen=True)
class MediaContext:
    """What the cross-attention blocks need for one LM call.

    kv: per block (in layer order), the projected keys/values of all images, or None for a
    text-only batch; visible: (B, T, N) which images each current token may attend to;
    keep: (B,) bool, the samples the blocks change (None: all of them; see
    ``CrossAttentionConfig.without_media``).
    """

    kv: list[MediaKV] | None
    visible: Tensor | None
    keep: Tensor | None = None


_CURRENT_MEDIA: contextvars.ContextVar[MediaContext | None] = contextvars.ContextVar("media", default=None)


class CrossAttentionDecoderLayer(nn.Module):
    """A decoder layer preceded by a gated cross-attention block."""

    def __init__(self, xattn: GatedCrossAttentionBlock, decoder_layer: nn.Module, index: int):
        super().__init__()
        self.xattn = xattn
        self.decoder_layer = decoder_layer
        self.index = index  # which entry of MediaContext.kv belongs to this block

    def forward(self, hidden_states: Tensor, *args, media: MediaContext | None = None, **kwargs):
        media = media if media is not None else _CURRENT_MEDIA.get()
        if media is None:
            raise RuntimeError("cross-attention layer called without media: call the LM through Flamingo")
        kv = media.kv[self.index] if media.kv is not None else None
        visible = media.visible
        if kv is not None and kv.k.device != hidden_states.device:  # a model spread over devices
            kv = MediaKV(kv.k.to(hidden_states.device), kv.v.to(hidden_states.device))
        if visible is not None:
            visible = visible.to(hidden_states.device)
        keep = None if media.keep is None else media.keep.to(hidden_states.device)
        hidden_states = self.xattn(hidden_states, kv, visible, keep)
        return self.decoder_layer(hidden_states, *args, **kwargs)


def find_decoder_layers(lm: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder-layer ModuleList: at ``path`` if given, else the only ModuleList whose
    length is the LM config's number of hidden layers."""
    if path is not None:
        try:
            layers = lm.get_submodule(path)
        except AttributeError:
            raise ValueError(f"lm.layers_path={path!r} does not exist in {type(lm).__name__}") from None
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"lm.layers_path={path!r} is a {type(layers).__name__}, not a ModuleList")
        return path, layers
    n_layers = getattr(lm.config, "num_hidden_layers", None)
    found = [
        (name, m)
        for name, m in lm.named_modules()
        if isinstance(m, nn.ModuleList) and (n_layers is None or len(m) == n_layers)
    ]
    if len(found) != 1:
        names = [name for name, _ in found] or "none"
        raise ValueError(
            f"cannot locate the decoder layers of {type(lm).__name__} (candidates: {names}); "
            "name them with lm.layers_path, e.g. 'model.layers'"
        )
    return found[0]


def accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params


def accepts_var_kwargs(fn: Callable) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


class LanguageModel(nn.Module):
    """An HF causal LM with cross-attention blocks and embeddings for new tokens.

    ``vocab_size`` is the tokenizer's length; logits always have that many columns.
    Tokens with ids >= ``new_token_start`` get their rows from ``extra_embed`` /
    ``extra_head`` (decoupled, IDEFICS-style) when ``decoupled`` is set; otherwise the LM's
    embeddings are resized to cover them.
    """

    def __init__(
        self,
        lm: nn.Module,
        make_block: Callable[[], GatedCrossAttentionBlock],
        *,
        interval: int,
        offset: int,
        vocab_size: int,
        new_token_start: int,
        decoupled: bool,
        layers_path: str | None = None,
    ):
        super().__init__()
        self.lm = lm
        self.vocab_size = vocab_size
        self.new_token_start = new_token_start
        path, layers = find_decoder_layers(lm, layers_path)
        self.layers_path = path
        chosen = [i for i in range(len(layers)) if i % interval == offset]
        if not chosen:
            raise ValueError(
                f"cross_attention interval={interval}, offset={offset} selects none of {len(layers)} layers"
            )
        for index, layer_idx in enumerate(chosen):
            layers[layer_idx] = CrossAttentionDecoderLayer(make_block(), layers[layer_idx], index)
        forward = self.base.forward
        self._media_by_kwarg = accepts_var_kwargs(forward)
        self._takes_position_ids = accepts(forward, "position_ids")
        n_new = vocab_size - new_token_start
        self.decoupled = decoupled
        self.extra_embed = self.extra_head = None
        if decoupled and n_new > 0:
            self.extra_embed, self.extra_head = _new_rows(lm, new_token_start, n_new)
        elif not decoupled and lm.get_input_embeddings().num_embeddings != vocab_size:
            lm.resize_token_embeddings(vocab_size)  # to the tokenizer's length exactly, as OpenFlamingo does

    @property
    def base(self) -> nn.Module:
        return self.lm.base_model

    def embed(self, input_ids: Tensor) -> Tensor:
        table = self.lm.get_input_embeddings()
        if self.extra_embed is None:
            return table(input_ids)
        is_new = input_ids >= self.new_token_start
        base = table(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        extra = self.extra_embed((input_ids - self.new_token_start).clamp(min=0)).to(base.device)
        return torch.where(is_new[..., None].to(base.device), extra, base)

    def head_parameters(self) -> list[nn.Parameter]:
        """The weights :meth:`logits` reads (the output head's, and the new tokens' rows)."""
        extra = [] if self.extra_head is None else list(self.extra_head.parameters())
        return [*self.lm.get_output_embeddings().parameters(), *extra]

    def logits(self, hidden: Tensor) -> Tensor:
        head = self.lm.get_output_embeddings()
        if self.extra_head is None:
            return head(hidden)[..., : self.vocab_size]
        logits = head(hidden)[..., : self.new_token_start]
        return torch.cat([logits, self.extra_head(hidden).to(logits.device)], dim=-1)

    def forward(
        self,
        input_ids: Tensor,
        *,
        media: MediaContext,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache=None,
        use_cache: bool = False,
    ):
        """Returns the base model's output (``last_hidden_state``, ``cache``). ``cache`` is the
        LM's KV cache (transformers' ``Cache``), passed by the name transformers >= 5.24 uses."""
        kwargs = dict(
            inputs_embeds=self.embed(input_ids),
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
        )
        if self._takes_position_ids and position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self._media_by_kwarg:
            kwargs["media"] = media
        with media_scope(media):
            return self.base(**kwargs)


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The ``context_fn`` of a non-reentrant activation checkpoint around a decoder layer:
    (context of the forward, context of the recomputation in backward). The recomputation runs
    outside the LM call, so it re-enters the media of the call that ran the forward (LMs that
    pass the media by keyword get them back with the saved keyword arguments anyway)."""
    media = _CURRENT_MEDIA.get()
    return contextlib.nullcontext(), media_scope(media) if media is not None else contextlib.nullcontext()


@contextlib.contextmanager
def media_scope(media: MediaContext):
    """Make ``media`` visible to the cross-attention layers for one LM call only."""
    token = _CURRENT_MEDIA.set(media)
    try:
        yield
    finally:
        _CURRENT_MEDIA.reset(token)


def _new_rows(lm: nn.Module, start: int, n_new: int) -> tuple[nn.Embedding, nn.Linear]:
    """Decoupled embeddings for the new tokens, initialised at the mean of the LM's rows."""
    table = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    if start > table.shape[0]:
        raise ValueError(f"new tokens start at id {start} but the LM has only {table.shape[0]} embeddings")
    embed = nn.Embedding(n_new, table.shape[1])
    out = nn.Linear(head.shape[1], n_new, bias=False)
    with torch.no_grad():
        embed.weight.copy_(table[:start].float().mean(0).expand_as(embed.weight))
        out.weight.copy_(head[:start].float().mean(0).expand_as(out.weight))
    return embed, out
