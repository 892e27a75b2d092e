import pytest
from PIL import Image

from interleaf.cli import main
from interleaf.demo import DemoOptions, run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run(DemoOptions(out=out, steps=30, batch_size=6))


def test_demo_trains_and_saves_a_loadable_model(demo_run):
    out, result = demo_run
    assert result["losses"][-1] < 0.7 * result["losses"][0]
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "preprocessor_config.json").exists()
    assert isinstance(result["answer"], str)


def test_generate_verb(demo_run, tmp_path, capsys):
    out, _ = demo_run
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 40, 40)).save(image)
    args = ["generate", "--model", str(out / "model"), "--prompt", "<image>a photo of a", "--image", str(image)]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--max-new-tokens", "3", "--stream"]) == 0
    assert capsys.readouterr().out == greedy


def test_generate_verb_reports_bad_input(demo_run, tmp_path, capsys):
    out, _ = demo_run
    code = main(["generate", "--model", str(out / "model"), "--prompt", "<image><image>two", "--image", "x.png"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("interleaf generate: error:") and "prompt 0" in err
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
    assert "neither a local directory" in capsys.readouterr().err
