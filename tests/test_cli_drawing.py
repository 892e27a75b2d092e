"""``interleaf generate --interleaved``: MM-Interleaved annt.json in, PNGs + annt.json + HTML out."""

import json

import pytest
import torch
from PIL import Image

from interleaf import Flamingo, Processor
from interleaf.cli import main
from interleaf.data.formats import read_annt

from drawhelp import draw_config


@pytest.fixture(scope="module")
def drawing_model(backbones, tmp_path_factory):
    config = draw_config(backbones, inference_steps=2)
    torch.manual_seed(0)
    model = Flamingo.from_config(config)
    where = tmp_path_factory.mktemp("drawing-model")
    model.save_pretrained(where)
    Processor(model.tokenizer, model.image_processor, tokens=config.tokens).save_pretrained(where)
    return where


def annt(tmp_path, records):
    Image.new("RGB", (32, 32), (40, 180, 60)).save(tmp_path / "green.png")
    path = tmp_path / "annt.json"
    path.write_text(json.dumps(records))
    return path


def test_annt_documents_are_continued_and_written(drawing_model, tmp_path, capsys):
    source = annt(
        tmp_path,
        [
            {"sentences": ["a page of shapes."], "images": [], "sentence_ixs": [], "image_first": []},
            {
                "sentences": ["the same shape in blue."],
                "images": ["green.png"],
                "sentence_ixs": [0],
                "image_first": [True],
                "generate_mode": "generate_images",
                "num_iter": 2,
            },
        ],
    )
    out = tmp_path / "out"
    args = ["generate", "--interleaved", "--model", str(drawing_model), "--input", str(source), "--out", str(out)]
    assert main([*args, "--max-new-tokens", "4", "--mode", "generate_texts"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "index.html" in printed
    records = json.loads((out / "annt.json").read_text())
    assert len(records) == 2
    first, second = records
    assert first["sentences"][0] == "a page of shapes."
    # its own generate_mode: an image is drawn first (a second one only if this random model
    # announces one; tests/model/test_imagegen.py checks the alternation itself)
    assert second["image_generated"][:2] == [False, True]  # the given picture, then a drawn one
    for record in records:
        for image in record["images"]:
            assert Image.open(out / image).size == (32, 32)
    back = list(read_annt(out / "annt.json"))  # what it writes, the annt reader reads
    assert len(back) == 2 and len(back[1].images) == len(second["images"])
    page = (out / "index.html").read_text()
    assert page.count("<article>") == 2 and page.count("drawn by the model") == sum(
        sum(r["image_generated"]) for r in records
    )
    # the same command again: the same documents (seeded); not into a folder already written
    assert main([*args, "--max-new-tokens", "4"]) == 2
    assert "is a folder that is not empty" in capsys.readouterr().err
    again = out.parent / "again"
    assert main([*args[:-1], str(again), "--max-new-tokens", "4"]) == 0
    assert f"wrote {len(list((again / 'images').glob('*.png')))} images" in capsys.readouterr().out
    assert json.loads((again / "annt.json").read_text()) == records  # image paths are relative
    # each record keeps the settings it was written with, so the file can be given to --input again
    assert [(r["generate_mode"], r["num_iter"]) for r in records] == [("generate_texts", 1), ("generate_images", 2)]
    names = [image.split("/")[-1] for image in second["images"]]
    assert [name.rsplit("-", 1)[1] for name in names] == [f"{k}.png" for k in range(len(names))]  # its k-th image


def test_a_prompt_with_images(drawing_model, tmp_path, capsys):
    image = tmp_path / "g.png"
    Image.new("RGB", (32, 32), (40, 180, 60)).save(image)
    out = tmp_path / "out"
    code = main(
        [
            "generate", "--interleaved", "--model", str(drawing_model), "--prompt", "<image>the same shape in blue.",
            "--image", str(image), "--out", str(out), "--mode", "generate_images", "--max-new-tokens", "3",
            "--image-guidance-scale", "1.5",
        ]
    )  # fmt: skip
    assert code == 0
    (record,) = json.loads((out / "annt.json").read_text())
    assert record["image_generated"][:2] == [False, True]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "needs --out DIR"),
        (["--out", "{tmp}/o", "--prompt", "x", "--input", "{annt}"], "one of them"),
        (["--out", "{tmp}/o"], "one of them"),
        (["--out", "{tmp}/o", "--prompt", "<image> x"], "1 <image> placeholder(s) for 0 --image file(s)"),
        (["--out", "{tmp}/o", "--input", "{misspelt}"], "unknown field 'generate_mod' (did you mean 'generate_mode'?)"),
        (["--out", "{tmp}/o", "--input", "{bad}"], "generate_mode must be one of"),
        (["--out", "{tmp}/o", "--input", "{broken}"], "broken.json"),
    ],
)
def test_bad_requests_are_one_line(drawing_model, tmp_path, capsys, extra, message):
    source = annt(tmp_path, [{"sentences": ["x"], "images": [], "sentence_ixs": [], "image_first": []}])
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [{"sentences": ["x"], "images": [], "sentence_ixs": [], "image_first": [], "generate_mode": "paint"}]
        )
    )
    broken = tmp_path / "broken.json"
    broken.write_text('[{"sentences": ["x"], "images": ["missing.png"], "sentence_ixs": [0], "image_first": [true]}]')
    misspelt = tmp_path / "misspelt.json"
    misspelt.write_text(
        json.dumps([{"sentences": ["x"], "images": [], "sentence_ixs": [], "image_first": [], "generate_mod": "x"}])
    )
    fill = {"tmp": tmp_path, "annt": source, "bad": bad, "broken": broken, "misspelt": misspelt}
    args = ["generate", "--interleaved", "--model", str(drawing_model), *[a.format(**fill) for a in extra]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("interleaf generate: error:") and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_a_text_only_model_does_not_draw(quick_demo, tmp_path, capsys):
    _, result = quick_demo
    code = main(["generate", "--interleaved", "--model", str(result["model"]), "--prompt", "x", "--out", str(tmp_path)])
    assert code == 2
    assert "does not draw" in capsys.readouterr().err


def test_plain_generate_still_needs_a_prompt(drawing_model, capsys):
    assert main(["generate", "--model", str(drawing_model)]) == 2
    assert "--prompt is required" in capsys.readouterr().err
    assert main(["generate", "--model", str(drawing_model), "--prompt", "x", "--out", "o"]) == 2
    assert "--out: only with --interleaved" in capsys.readouterr().err


def test_interleaved_options_are_checked_before_the_model_loads(drawing_model, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(Flamingo, "from_pretrained", no_loading)
    afile = tmp_path / "afile"
    afile.write_text("")
    source = annt(
        tmp_path,
        [
            {"id": "d0", "sentences": ["x"], "images": [], "sentence_ixs": [], "image_first": []},
            {"id": "d1", "sentences": ["a", "b <image> c"], "images": [], "sentence_ixs": [], "image_first": []},
        ],
    )
    base = ["generate", "--interleaved", "--model", str(drawing_model)]
    new = ["--out", str(tmp_path / "new")]
    for extra, message in [
        (["--prompt", "a red star.", "--out", str(afile)], f"--out: {afile} is a file, not a directory"),
        (["--prompt", "a red star.", "--out", str(afile / "sub")], f"--out: {afile} is a file, not a directory"),
        (["--prompt", "a red star.", *new, "--num-beams", "3", "--stream"], "--num-beams, --stream do not apply"),
        (["--prompt", "  ", *new], "--prompt is empty"),
        (["--prompt", "a<|beginofimage|>", *new], "prompt, item 0: the text contains the token '<|beginofimage|>'"),
        (["--input", str(source), *new], "d1, item 0: the text contains the token '<image>'"),
        (["--prompt", "x", *new, "--seed", str(2**64)], "argument --seed: must be in [0, 2**62)"),
        (["--prompt", "x", *new, "--seed", "-1"], "argument --seed: must be in [0, 2**62)"),
        (["--prompt", "x", *new, "--image-guidance-scale", "-1"], "argument --image-guidance-scale:"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()
    plain = ["generate", "--model", str(drawing_model), "--prompt", "a red star."]
    assert main([*plain, "--mode", "generate_images", "--num-iter", "2"]) == 2
    assert "--mode, --num-iter: only with --interleaved" in capsys.readouterr().err
    assert main([*plain, "--image-guidance-scale", "2"]) == 2
    assert "--image-guidance-scale: only with --interleaved" in capsys.readouterr().err


def test_the_document_keeps_its_own_id(drawing_model, tmp_path, capsys):
    source = tmp_path / "annt.json"
    source.write_text(
        json.dumps([{"id": "doc-a", "sentences": ["a page."], "images": [], "sentence_ixs": [], "image_first": []}])
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--interleaved",
                "--model",
                str(drawing_model),
                "--input",
                str(source),
                "--out",
                str(out),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert json.loads((out / "annt.json").read_text())[0]["id"] == "doc-a"
    assert "doc-a, written by the model:" in capsys.readouterr().out


def test_another_familys_directory_is_loaded_before_it_is_checked(tmp_path, capsys, monkeypatch):
    """A directory whose config.json is not interleaf's (an IDEFICS or InfiMM one) is not refused for
    it: the documents are checked once the model is loaded (here, the loading is stubbed out)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics", "vocab_size": 10}))

    def loaded(*args, **kwargs):
        raise ValueError("loaded")

    monkeypatch.setattr(Flamingo, "from_pretrained", loaded)
    args = ["generate", "--interleaved", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "error: loaded" in capsys.readouterr().err
