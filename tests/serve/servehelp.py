"""A tiny model served over real HTTP (uvicorn in a thread, a free port on 127.0.0.1)."""

import base64
import io
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch
import uvicorn
from PIL import Image

from interleaf import Flamingo, Processor
from interleaf.serve.api import ServeOptions, create_app
from interleaf.serve.protocol import Limits

MODEL_NAME = "tiny"
API_KEY = "sk-test-key"


@dataclass
class Served:
    url: str
    model: Flamingo
    processor: Processor
    app: object
    options: ServeOptions

    @property
    def scheduler(self):
        return self.app.state.scheduler


class ServerThread:
    """uvicorn serving ``app`` on a free port until ``stop``."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start(model, processor, **options) -> tuple[Served, ServerThread]:
    options = ServeOptions(**{"model_name": MODEL_NAME, **options})
    app = create_app(model, processor, options)
    thread = ServerThread(app)
    return Served(f"http://127.0.0.1:{thread.port}", model, processor, app, options), thread


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, backbones):
    """A tiny llama Flamingo with open gates, saved and loaded as a user's checkpoint is."""
    from conftest import open_gates, tiny_config

    torch.manual_seed(0)
    model = Flamingo.from_config(tiny_config(backbones, "llama"))
    open_gates(model)
    directory = tmp_path_factory.mktemp("served") / "tiny"
    model.save_pretrained(directory)
    return Flamingo.from_pretrained(directory), Processor.from_pretrained(directory), directory


@pytest.fixture(scope="module")
def served(tiny_model):
    model, processor, _ = tiny_model
    limits = Limits(
        max_batch_size=8,
        max_waiting=64,
        max_images=4,
        max_image_pixels=1_000_000,
        max_tokens=64,
        max_request_bytes=2**20,
    )
    served, thread = start(model, processor, api_key=API_KEY, limits=limits)
    yield served
    thread.stop()


def png(color=(200, 40, 40), size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()
