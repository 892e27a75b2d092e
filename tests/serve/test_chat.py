"""``interleaf chat`` (the session, the loop, the verb) and ``interleaf serve`` as a process."""

import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from interleaf.cli import main
from interleaf.generation import decode
from interleaf.processing import chat_stop_strings
from interleaf.serve.chat import ChatSession, run
from interleaf.tiny import CHAT_TEMPLATE, build_tokenizer

from servehelp import tiny_model  # noqa: F401

CLI = [sys.executable, "-m", "interleaf"]


def greedy(model, processor, conversation, max_new_tokens):
    stops = chat_stop_strings(processor.tokenizer)
    ids = model.generate(**processor([conversation]), max_new_tokens=max_new_tokens, stop_strings=stops)
    return decode(processor.tokenizer, ids, stops)[0]


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(path)
    return path


def test_session_keeps_the_conversation_and_its_images(tiny_model, picture):
    model, processor, _ = tiny_model
    session = ChatSession(model, processor, max_new_tokens=10)
    image = session.attach(str(picture))
    first = "".join(session.reply("What is this?"))
    assert first == greedy(model, processor, [{"role": "user", "content": [image, "What is this?"]}], 10)
    second = "".join(session.reply("And the colour?"))
    conversation = [
        {"role": "user", "content": [image, "What is this?"]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": ["And the colour?"]},
    ]
    assert second == greedy(model, processor, conversation, 10)  # the history, image included
    assert len(session.messages) == 4 and session.images == []
    session.reset()
    assert "".join(session.reply("What is this?")) == greedy(
        model, processor, [{"role": "user", "content": ["What is this?"]}], 10
    )


def test_the_loop_commands(tiny_model, picture, tmp_path):
    model, processor, _ = tiny_model
    session = ChatSession(model, processor, max_new_tokens=6)
    lines = [
        "/help",
        f"/image {picture}",
        f"/image {tmp_path / 'missing.png'}",
        "/image",
        "What is this?",
        str(picture),  # a path on its own line attaches it too
        "/frobnicate",
        "/reset",
        "hello",
        "/quit",
        "never read",
    ]
    out = io.StringIO()
    run(session, io.StringIO("\n".join(lines) + "\n"), out)
    text = out.getvalue()
    assert "/reset" in text and "commands:" in text
    assert "(image 1 attached:" in text and "40x30" in text
    assert "missing.png" in text and "error:" in text  # a bad path: one line, and the chat goes on
    assert "usage: /image PATH" in text
    assert "unknown command /frobnicate" in text
    assert "(conversation cleared)" in text
    answer = greedy(
        model, processor, [{"role": "user", "content": [Image.open(picture).convert("RGB"), "What is this?"]}], 6
    )
    assert answer in text
    assert len(session.messages) == 2 and session.messages[0]["content"] == ["hello"]  # after the reset
    assert session.images == []  # the image attached before /reset was dropped with it


def test_chat_verb_streams_in_a_terminal(tiny_model, picture):
    model, processor, directory = tiny_model
    stdin = f"/image {picture}\nWhat is this?\n/quit\n"
    result = subprocess.run(
        [*CLI, "chat", "--model", str(directory), "--max-new-tokens", "8"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    image = Image.open(picture).convert("RGB")
    assert greedy(model, processor, [{"role": "user", "content": [image, "What is this?"]}], 8) in result.stdout


def test_chat_and_serve_refuse_bad_arguments(tmp_path, capsys):
    for args in (
        ["chat", "--model", str(tmp_path / "nothing")],
        ["chat", "--model", str(tmp_path), "--temperature", "-1"],
        ["serve", "--model", str(tmp_path), "--port", "70000"],
        ["serve", "--model", str(tmp_path), "--max-images", "0"],
        ["serve", "--model", str(tmp_path / "nothing")],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, (args, err)


def test_serve_verb_serves_until_interrupted(tiny_model):
    """--port 0 takes any free port and the banner says which; a line per request is logged."""
    _, _, directory = tiny_model
    env = {**os.environ, "INTERLEAF_API_KEY": "from-env"}
    server = subprocess.Popen(
        [*CLI, "serve", "--model", str(directory), "--port", "0", "--model-name", "mine", "--max-tokens", "16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        banner = [server.stdout.readline()]
        while "chat page" not in banner[-1]:
            assert banner[-1], (banner, server.stderr.read())  # '' is the end: the server exited
            banner.append(server.stdout.readline())
        page = banner[-1]
        url = page.split()[-1].rstrip("/")
        assert not url.endswith(":0"), banner
        health = httpx.get(f"{url}/health").json()
        assert health["model"] == "mine" and health["api_key_required"] and health["limits"]["max_tokens"] == 16
        assert health["context_length"] == 512
        body = {"model": "mine", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer from-env"})
        assert reply.status_code == 200 and reply.json()["model"] == "mine"
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert "Traceback" not in err
    assert '"POST /v1/chat/completions HTTP/1.1" 401' in out and '"POST /v1/chat/completions HTTP/1.1" 200' in out


def test_the_chat_format_decides_where_a_turn_ends():
    assert chat_stop_strings(build_tokenizer()) == ("<end_of_utterance>", "\nUser:")  # IDEFICS-instruct
    assert chat_stop_strings(build_tokenizer(chat_template=CHAT_TEMPLATE)) == ("</s>",)  # the template's end of turn


def test_ctrl_c_stops_an_answer_and_special_tokens_are_refused(tiny_model):
    model, processor, _ = tiny_model
    session = ChatSession(model, processor, max_new_tokens=6)
    calls = []

    def interrupted(text):
        calls.append(text)
        if len(calls) == 1:
            raise KeyboardInterrupt
        yield "fine"

    session.reply = interrupted
    out = io.StringIO()
    run(session, io.StringIO("first\nsecond\n/quit\n"), out)
    assert "(stopped; this turn is dropped)" in out.getvalue() and "fine" in out.getvalue()
    session = ChatSession(model, processor, max_new_tokens=6)
    out = io.StringIO()
    run(session, io.StringIO("look <image> here\nhi </s> User: x\n/quit\n"), out)
    text = out.getvalue()
    assert "'<image>' is one of the model's special tokens" in text and "/image PATH" in text
    assert "'</s>' is one of the model's special tokens" in text
    assert session.messages == []


def test_serve_refuses_a_port_in_use_before_loading(tiny_model, capsys):
    _, _, directory = tiny_model
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", "--model", str(directory), "--port", str(port)]) == 2
        assert time.monotonic() - started < 2  # refused before the model loads
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


def test_a_scheduler_left_open_does_not_abort_the_interpreter(tiny_model, tmp_path):
    _, _, directory = tiny_model
    script = tmp_path / "left_open.py"
    script.write_text(
        "from interleaf import Flamingo\n"
        "from interleaf.generation import GenerationConfig\n"
        "from interleaf.serve.batch import Prompt\n"
        "from interleaf.serve.scheduler import Scheduler\n"
        f"model = Flamingo.from_pretrained({str(directory)!r})\n"
        "scheduler = Scheduler(model)\n"
        "ids = model.tokenizer('hello', return_tensors='pt').input_ids[0]\n"
        "events = list(scheduler.stream(Prompt(ids), GenerationConfig(max_new_tokens=3)))\n"
        "print(events[-1].kind)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]
