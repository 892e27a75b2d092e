"""Tiny backbones written to disk in the real Hugging Face formats.

The tests and the demo never reach a model hub: they build small random (or, in the demo,
locally trained) language models, vision encoders and tokenizers with these functions and
then load them through the same code paths as released checkpoints.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = """\
a photo of a red circle on a blue background. a small green square at the top left.
two yellow triangles and one purple star. what colour is the shape? red. how many shapes are
there? three. is there a circle? yes. is there a square? no. the dog sits on the grass.
the cat is black and white. an image of a large orange ball near the bottom right corner.
question: what is in the picture? short answer: a bird. output: a boat on the water.
user: describe this image. assistant: it shows a tree under a grey sky with clouds.
0 1 2 3 4 5 6 7 8 9 10 the quick brown fox jumps over the lazy dog! Who? Why, how, when.
"""

LM_FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "mpt")
VISION_KINDS = ("clip", "siglip")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(
    directory: str | Path | None = None,
    *,
    vocab_size: int = 300,
    pad_token: str | None = None,
    chat_template: str | None = None,
    corpus: str = CORPUS,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes, nothing is unknown) with ``<s>``/``</s>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=pad_token
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


# Zephyr's chat template, as InfiMM's tokenizer_config.json ships it
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def build_llama_tokenizer(
    *, vocab_size: int = 400, chat_template: str | None = ZEPHYR_CHAT_TEMPLATE, corpus: str = CORPUS
) -> transformers.PreTrainedTokenizerBase:
    """A small tokenizer of the Llama/Mistral kind (BPE over Metaspace pieces, legacy, BOS
    added by the tokenizer, ``</s>`` as pad), with Zephyr's chat template by default. Unlike
    :func:`build_tokenizer`'s byte-level one, it tokenizes text after a special token
    differently from text at the start, as sentencepiece tokenizers do."""
    corpus = corpus + "<|user|>\n<|system|>\n<|assistant|>\n"
    alphabet = set(corpus.replace(" ", "\u2581")) | set(string.ascii_letters + string.digits + string.punctuation)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=sorted(alphabet),  # every printable ASCII character: nothing typed is lost
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = transformers.LlamaTokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], legacy=True, add_bos_token=True
    )
    tok.pad_token = "</s>"
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def lm_config(family: str, vocab_size: int, *, hidden: int = 32, layers: int = 4, heads: int = 4, **kw):
    """A small transformers config of one of the supported LM families."""
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if family in ("llama", "mistral", "qwen2"):
        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[family]
        cfg = cls(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **common,
        )
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **common)
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=512,
            **common,
        )
    elif family == "opt":
        cfg = transformers.OPTConfig(
            hidden_size=hidden,
            ffn_dim=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            word_embed_proj_dim=hidden,
            max_position_embeddings=512,
            **common,
        )
    elif family == "mpt":
        cfg = transformers.MptConfig(
            d_model=hidden, n_heads=heads, n_layers=layers, expansion_ratio=2, max_seq_len=512, **common
        )
    else:
        raise ValueError(f"unknown LM family {family!r}; known: {', '.join(LM_FAMILIES)}")
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def build_lm(directory: str | Path, family: str = "llama", *, seed: int = 0, tokenizer=None, **kw) -> Path:
    """Write a random tiny causal LM (weights, config, tokenizer) to ``directory``."""
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    vocab_size = kw.pop("vocab_size", len(tokenizer))  # may exceed the tokenizer, as Qwen2's and OPT's do
    model = transformers.AutoModelForCausalLM.from_config(lm_config(family, vocab_size, **kw))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def vision_config(kind: str = "clip", *, image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2):
    kw = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    if kind == "clip":
        return transformers.CLIPVisionConfig(**kw)
    if kind == "siglip":
        return transformers.SiglipVisionConfig(**kw)
    raise ValueError(f"unknown vision kind {kind!r}; known: {', '.join(VISION_KINDS)}")


def build_vision(directory: str | Path, kind: str = "clip", *, seed: int = 0, **kw) -> Path:
    """Write a random tiny vision encoder and its image-processor config to ``directory``."""
    cfg = vision_config(kind, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(cfg)
    model.save_pretrained(directory)
    size = cfg.image_size
    if kind == "clip":
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    else:
        processor = transformers.SiglipImageProcessor(size={"height": size, "width": size})
    processor.save_pretrained(directory)
    return Path(directory)


def build_idefics(path, *, padding_side="left", instruct=False, decoupled=True, **overrides):
    """A tiny random IDEFICS saved as transformers writes it, with tokenizer and image processor.

    ``decoupled``: the new tokens live in additional (decoupled) rows, as in the released
    models; otherwise they are ordinary rows of the vocabulary.
    """
    tok = build_tokenizer()
    extra = ["<fake_token_around_image>", "<image>"] + (["<end_of_utterance>"] if instruct else [])
    vocab = len(tok) if decoupled else len(tok) + len(extra)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
    tok.pad_token = "<unk>"
    tok.padding_side = padding_side
    use_resampler = overrides.pop("use_resampler", True)
    qk_perceiver = overrides.pop("qk_layer_norms_perceiver", False)
    config = transformers.IdeficsConfig(
        vocab_size=vocab,
        additional_vocab_size=len(tok) - vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=overrides.pop("cross_layer_interval", 2),
        use_resampler=use_resampler,
        initializer_range=0.1,  # large enough weights that the images move the logits by far more than 1e-4
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        vision_config=dict(
            embed_dim=24, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40
        ),
        perceiver_config=dict(
            use_resampler=use_resampler,
            resampler_n_latents=3,
            resampler_depth=2,
            resampler_n_heads=2,
            resampler_head_dim=8,
            qk_layer_norms_perceiver=qk_perceiver,
        ),
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():  # non-zero gates so the images matter; random norm weights too
        for name, param in model.named_parameters():
            if "alpha" in name or ("norm" in name and name.endswith("weight")):
                param.copy_(torch.randn_like(param) * 0.5 + (0 if "alpha" in name else 1))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    transformers.IdeficsImageProcessorPil(image_size=32).save_pretrained(path)
    return model
