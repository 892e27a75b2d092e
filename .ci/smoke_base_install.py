"""Smoke test of a base install (`pip install .`, no extras): interleaf imports, builds a model,
generates, saves and loads it, converts an IDEFICS checkpoint, and a feature whose extra is
missing fails with one line naming the extra. Run by .ci/run in a virtualenv of its own."""

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

import interleaf
from interleaf import Flamingo, FlamingoConfig, Processor
from interleaf.config import CrossAttentionConfig, LMConfig, LoraConfig, ResamplerConfig, TrainableConfig, VisionConfig
from interleaf.extras import MissingExtra
from interleaf.tiny import build_idefics, build_lm, build_tokenizer, build_vision

EXTRAS_ONLY = (
    "peft",
    "tensorboard",
    "sklearn",
    "pycocoevalcap",
    "nltk",
    "pytest",
    "deepspeed",
    "img2dataset",
    "fastapi",
    "uvicorn",
)


def main() -> None:
    present = [name for name in EXTRAS_ONLY if importlib.util.find_spec(name) is not None]
    assert not present, f"not a base install: {present} installed"
    root = Path(tempfile.mkdtemp(prefix="interleaf-base-"))
    build_lm(root / "lm", "llama", tokenizer=build_tokenizer())
    build_vision(root / "vision", "clip")
    config = FlamingoConfig(
        lm=LMConfig(source=str(root / "lm")),
        vision=VisionConfig(source=str(root / "vision")),
        resampler=ResamplerConfig(depth=1, num_latents=4, heads=2, head_dim=8),
        cross_attention=CrossAttentionConfig(heads=2, head_dim=8, interval=2),
    )
    model = Flamingo.from_config(config)
    processor = Processor.from_backbones(config.lm.source, config.vision.source)
    picture = Image.new("RGB", (32, 32), (200, 40, 40))
    batch = processor(processor_prompt(picture))
    ids = model.generate(**batch, max_new_tokens=5)
    text = processor.batch_decode(ids)[0]

    model.save_pretrained(root / "ckpt")
    loaded, reloaded = Flamingo.from_pretrained(root / "ckpt"), Processor.from_pretrained(root / "ckpt")
    assert processor.batch_decode(loaded.generate(**reloaded(processor_prompt(picture)), max_new_tokens=5))[0] == text

    build_idefics(root / "idefics")
    idefics = Flamingo.from_pretrained(root / "idefics")  # converted on the fly
    idefics_processor = Processor.from_pretrained(root / "idefics")
    idefics.generate(**idefics_processor([picture, "What is this?"]), max_new_tokens=3)
    picture.save(root / "red.png")
    cli = [sys.executable, "-m", "interleaf.cli"]
    subprocess.run([*cli, "convert", "idefics", str(root / "idefics"), str(root / "idefics-converted")], check=True)
    prompt = ["generate", "--model", str(root / "idefics-converted"), "--prompt", "<image>Output:"]
    subprocess.run([*cli, *prompt, "--image", str(root / "red.png"), "--max-new-tokens", "3"], check=True)

    chat = subprocess.run(
        [*cli, "chat", "--model", str(root / "ckpt"), "--max-new-tokens", "3"],
        input=f"/image {root / 'red.png'}\nWhat is this?\n/quit\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert "(image 1 attached:" in chat.stdout, chat.stdout
    serve = subprocess.run([*cli, "serve", "--model", str(root / "ckpt")], capture_output=True, text=True)
    assert serve.returncode == 2 and "pip install 'interleaf[serve]'" in serve.stderr, serve.stderr

    lora = FlamingoConfig(**{**config.__dict__, "trainable": TrainableConfig(lora=LoraConfig(rank=2))})
    try:
        Flamingo.from_config(lora)
        raise AssertionError("LoRA built without peft")
    except MissingExtra as e:
        assert "pip install 'interleaf[train]'" in str(e) and "\n" not in str(e), e
    print(
        f"base install of interleaf {interleaf.__version__}: import, build, generate ({text!r}), save/load, "
        "IDEFICS conversion, the generate and chat verbs work; LoRA and serve name their extras"
    )


def processor_prompt(picture):
    return [[picture, "Output: a red square.<|endofchunk|>", picture, "Output:"]]


if __name__ == "__main__":
    main()
