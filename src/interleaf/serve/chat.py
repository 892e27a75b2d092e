"""``interleaf chat``: a conversation with a model in the terminal.

Type a message and press Enter; the answer streams in. Attach images to your next message
with ``/image PATH`` (or by typing an image's path on its own line); ``/reset`` starts a new
conversation, ``/quit`` (or end of input) leaves, ``/help`` lists the commands. The
conversation is written in the model's own chat format (its tokenizer's chat template, or the
IDEFICS-instruct format ``User: ...<end_of_utterance>\\nAssistant:``) and the answer ends where
that format ends a turn.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from PIL import Image

from interleaf.generation import GenerationConfig, stream
from interleaf.images import ImageError, load_image
from interleaf.model.flamingo import Flamingo
from interleaf.processing import Processor, chat_stop_strings, special_tokens_in
from interleaf.serve.batch import max_sequence_length

HELP = """commands:
  /image PATH   attach an image to your next message (or type the path on its own line)
  /reset        forget the conversation and start a new one
  /quit         leave (so does Ctrl-D)
  /help         this list"""

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def load(model_dir: str, *, device: str = "auto", dtype: str | None = None):
    """The model and its processor, from an interleaf checkpoint (or an upstream one)."""
    model = Flamingo.from_pretrained(model_dir, device=device, dtype=dtype)
    return model, Processor.from_pretrained(model_dir)


@dataclass
class ChatSession:
    """The state of one conversation: the messages so far and the images waiting for the next."""

    model: object
    processor: Processor
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)

    def __post_init__(self):
        self.config = self.check(self.max_new_tokens, self.temperature, self.seed)
        self.config["stop_strings"] = chat_stop_strings(self.processor.tokenizer)
        self.max_length = max_sequence_length(self.model)

    @staticmethod
    def check(max_new_tokens: int, temperature: float, seed: int | None = None) -> dict:
        """The generation settings (temperature 0: greedy), checked; a ValueError names a bad one."""
        sample = temperature > 0
        config = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else 1.0,
            seed=seed,
        )
        GenerationConfig(**config)
        return config

    def attach(self, path: str) -> Image.Image:
        image = load_image(Path(path).expanduser(), str(path))
        self.images.append(image)
        return image

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()

    def reply(self, text: str):
        """Yield the answer to ``text`` (with the attached images) piece by piece; the turn
        joins the conversation once the answer is complete."""
        found = special_tokens_in(text, self.processor.tokenizer)
        if found:
            hint = "; attach images with /image PATH" if self.processor.tokens.image in found else ""
            raise ValueError(f"{found[0]!r} is one of the model's special tokens, which a message may not write{hint}")
        message = {"role": "user", "content": [*self.images, text]}
        batch = self.processor([[*self.messages, message]])
        length = batch["input_ids"].shape[1]
        if self.max_length is not None and length + 1 > self.max_length:
            raise ValueError(
                f"the conversation is {length} tokens and the model reads at most {self.max_length}; "
                "/reset to start over"
            )
        config = dict(self.config)
        if self.max_length is not None:
            config["max_new_tokens"] = min(config["max_new_tokens"], self.max_length - length)
        answer = []
        for piece in stream(self.model, **batch, **config):
            answer.append(piece)
            yield piece
        self.messages += [message, {"role": "assistant", "content": "".join(answer)}]
        self.images = []


def run(session: ChatSession, source: TextIO = sys.stdin, output: TextIO = sys.stdout, prompt: str = "> ") -> None:
    """The read-answer loop until /quit or the end of ``source``. Ctrl-C stops an answer (the
    turn is dropped) and returns to the prompt; at the prompt it says how to leave."""

    def say(text: str = "", end: str = "\n") -> None:
        output.write(text + end)
        output.flush()

    terminal = source is sys.stdin and output is sys.stdout and sys.stdin.isatty()
    if terminal:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())

    def read() -> str:
        if terminal:
            try:
                return input(prompt) + "\n"
            except EOFError:
                return ""
        say(prompt, end="")
        return source.readline()

    say("interleaf chat: type a message; /image PATH attaches an image, /reset, /quit, /help")
    while True:
        try:
            line = read()
        except KeyboardInterrupt:
            say("\n(/quit or Ctrl-D leaves)")
            continue
        if not line:
            say()
            return
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command == "/quit":
            return
        if command == "/help":
            say(HELP)
        elif command == "/reset":
            session.reset()
            say("(conversation cleared)")
        elif command == "/image" or _looks_like_image(line):
            path = argument.strip() if command == "/image" else line
            if not path:
                say("usage: /image PATH")
                continue
            try:
                image = session.attach(path)
            except ImageError as e:
                say(f"error: {e}")
                continue
            say(f"(image {len(session.images)} attached: {path}, {image.width}x{image.height})")
        elif command.startswith("/") and " " not in command[1:] and not Path(line).exists():
            say(f"unknown command {command}; /help lists them")
        else:
            try:
                for piece in session.reply(line):
                    say(piece, end="")
            except ValueError as e:
                say(f"error: {e}")
                continue
            except KeyboardInterrupt:
                say("\n(stopped; this turn is dropped)")
                continue
            say()


def _looks_like_image(line: str) -> bool:
    path = Path(line).expanduser()
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
