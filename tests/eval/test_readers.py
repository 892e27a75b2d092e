"""Task readers on tiny fixtures in the real file layouts, their errors, and the task files."""

import dataclasses
import json
import re
import string
from collections import Counter
from pathlib import Path

import pytest
import yaml

from interleaf.data import tinyworld
from interleaf.data.schema import ImageRef
from interleaf.eval.readers import READERS, hateful_memes, image_folder, karpathy, multiple_choice, vqa
from interleaf.eval.task import Example, TaskSpec
from interleaf.eval.tasks import TASK_DIR, TASKS, load_task, parse_task, task_file

IMAGE = b"never decoded"  # readers check that image files exist, nothing more


def touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(IMAGE)
    return str(path)


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------
# Karpathy captions

SENTENCES = {
    "a": ["A man rides a horse.", "a person on a horse", "Horse and rider. ", "a rider", "someone riding"],
    "b": ["Two cats sleep.", "cats on a sofa", "two cats", "sleeping cats", "a pair of cats"],
}


def coco_karpathy(tmp_path: Path) -> Path:
    """COCO's Karpathy file: ``filepath`` names the COCO folder, ``cocoid`` the image."""
    images = [
        ("train2014", "COCO_train2014_000000000009.jpg", "train", 9, SENTENCES["a"]),
        ("val2014", "COCO_val2014_000000000042.jpg", "restval", 42, SENTENCES["b"]),
    ]
    records = []
    for imgid, (filepath, filename, split, cocoid, raws) in enumerate(images):
        touch(tmp_path / "coco" / filepath / filename)
        sentences = [
            {"raw": raw, "tokens": raw.lower().split(), "imgid": imgid, "sentid": 5 * imgid + j}
            for j, raw in enumerate(raws)
        ]
        records.append(
            {
                "filepath": filepath,
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        )
    return write_json(tmp_path / "coco" / "dataset_coco.json", {"images": records, "dataset": "coco"})


def test_karpathy_reads_coco_with_filepath_cocoid_and_several_splits(tmp_path):
    path = coco_karpathy(tmp_path)
    root = tmp_path / "coco"
    train = Example(
        id="9",
        image=ImageRef(path=str(root / "train2014" / "COCO_train2014_000000000009.jpg")),
        answers=("A man rides a horse.", "a person on a horse", "Horse and rider.", "a rider", "someone riding"),
    )
    restval = Example(
        id="42",
        image=ImageRef(path=str(root / "val2014" / "COCO_val2014_000000000042.jpg")),
        answers=tuple(SENTENCES["b"]),
    )
    assert karpathy(path, root, "train") == [train]
    assert karpathy(str(path), str(root), ["train", "restval"]) == [train, restval]


def test_karpathy_reads_flickr_without_filepath_by_imgid(tmp_path):
    touch(tmp_path / "images" / "1000092795.jpg")
    record = {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "Two young guys."}]}
    path = write_json(tmp_path / "dataset_flickr30k.json", {"images": [record]})
    expected = Example(
        id="0", image=ImageRef(path=str(tmp_path / "images" / "1000092795.jpg")), answers=("Two young guys.",)
    )
    assert karpathy(path, tmp_path / "images", "test") == [expected]


def test_karpathy_errors_name_the_file_and_the_record(tmp_path):
    path = coco_karpathy(tmp_path)
    root = tmp_path / "coco"
    with pytest.raises(ValueError, match=r"no_such\.json: no such file"):
        karpathy(tmp_path / "no_such.json", root, "test")
    with pytest.raises(ValueError, match=r"dataset_coco\.json: no images of split \['test'\]"):
        karpathy(path, root, "test")
    (root / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(ValueError, match=r"images\[1\] \(cocoid 42\): image file .*COCO_val2014_000000000042\.jpg"):
        karpathy(path, root, "restval")
    data = json.loads(path.read_text())
    del data["images"][0]["sentences"][2]["raw"]
    write_json(path, data)
    with pytest.raises(
        ValueError, match=r"dataset_coco\.json: images\[0\] \(cocoid 9\): sentences\[2\]: missing field 'raw'"
    ):
        karpathy(path, root, "train")


# ---------------------------------------------------------------------------------------------
# VQA

HUMAN = {
    458752000: ["net"] * 8 + ["netting", "mesh"],
    262148000: ["yes"] * 10,
}


def vqav2(tmp_path: Path, drop_annotation: int | None = None, extra_annotation: bool = False) -> tuple[Path, Path]:
    """VQAv2 val files: questions and annotations paired by question id (annotations in another order)."""
    questions = [
        {"image_id": 458752, "question": "What is this photo taken looking through?", "question_id": 458752000},
        {"image_id": 262148, "question": "Is the man wearing a hat?", "question_id": 262148000},
    ]
    annotations = [
        {
            "question_id": qid,
            "image_id": qid // 1000,
            "question_type": "what",
            "answer_type": "other",
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)],
        }
        for qid, answers in reversed(HUMAN.items())
        if qid != drop_annotation
    ]
    if extra_annotation:
        annotations.append({"question_id": 7, "answers": [{"answer": "x"}]})
    for q in questions:
        touch(tmp_path / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg")
    q_path = write_json(
        tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"task_type": "Open-Ended", "questions": questions}
    )
    a_path = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    return q_path, a_path


def test_vqa_pairs_questions_with_their_ten_human_answers(tmp_path):
    q_path, a_path = vqav2(tmp_path)
    examples = vqa(q_path, a_path, tmp_path / "val2014", "COCO_val2014_{image_id:012d}.jpg")
    assert examples == [
        Example(
            id="458752000",
            image=ImageRef(path=str(tmp_path / "val2014" / "COCO_val2014_000000458752.jpg")),
            fields={"question": "What is this photo taken looking through?"},
            answers=("net",) * 8 + ("netting", "mesh"),
        ),
        Example(
            id="262148000",
            image=ImageRef(path=str(tmp_path / "val2014" / "COCO_val2014_000000262148.jpg")),
            fields={"question": "Is the man wearing a hat?"},
            answers=("yes",) * 10,
        ),
    ]


def test_vqa_image_ids_that_are_file_names(tmp_path):
    """VizWiz in the VQAv2 format: the image id is the file name."""
    touch(tmp_path / "val" / "VizWiz_val_00000000.jpg")
    q = write_json(
        tmp_path / "q.json",
        {"questions": [{"question_id": 0, "image_id": "VizWiz_val_00000000.jpg", "question": "What?"}]},
    )
    a = write_json(
        tmp_path / "a.json", {"annotations": [{"question_id": 0, "answers": [{"answer": "unanswerable"}] * 10}]}
    )
    (example,) = vqa(q, a, tmp_path / "val")
    assert example.image == ImageRef(path=str(tmp_path / "val" / "VizWiz_val_00000000.jpg"))
    with pytest.raises(ValueError, match=r"q\.json: questions\[0\] \(question_id 0\): image pattern"):
        vqa(q, a, tmp_path / "val", "COCO_val2014_{image_id:012d}.jpg")


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            {"drop_annotation": 262148000},
            r"mismatched question ids .*1 question\(s\) without an annotation \(e\.g\. \[262148000\]\)",
        ),
        (
            {"extra_annotation": True},
            r"mismatched question ids .*1 annotation\(s\) without a question \(e\.g\. \[7\]\)",
        ),
    ],
)
def test_vqa_mismatched_question_ids_are_errors(tmp_path, damage, message):
    q_path, a_path = vqav2(tmp_path, **damage)
    with pytest.raises(ValueError, match=message) as info:
        vqa(q_path, a_path, tmp_path / "val2014", "COCO_val2014_{image_id:012d}.jpg")
    assert str(q_path) in str(info.value) and str(a_path) in str(info.value)


def test_vqa_errors_name_the_file_and_the_record(tmp_path):
    q_path, a_path = vqav2(tmp_path)
    pattern = "COCO_val2014_{image_id:012d}.jpg"
    with pytest.raises(ValueError, match=r"missing_annotations\.json: no such file"):
        vqa(q_path, tmp_path / "missing_annotations.json", tmp_path / "val2014", pattern)
    (tmp_path / "val2014" / "COCO_val2014_000000262148.jpg").unlink()
    with pytest.raises(
        ValueError, match=r"questions\[1\] \(question_id 262148000\): image file .*262148\.jpg does not exist"
    ):
        vqa(q_path, a_path, tmp_path / "val2014", pattern)
    data = json.loads(q_path.read_text())
    del data["questions"][0]["question"]
    write_json(q_path, data)
    with pytest.raises(
        ValueError, match=r"questions\.json: questions\[0\] \(question_id 458752000\): missing field 'question'"
    ):
        vqa(q_path, a_path, tmp_path / "val2014", pattern)
    write_json(q_path, {"questions": []})
    write_json(a_path, {"annotations": []})
    with pytest.raises(ValueError, match=r"questions\.json: no questions found"):
        vqa(q_path, a_path, tmp_path / "val2014", pattern)


# ---------------------------------------------------------------------------------------------
# HatefulMemes

MEMES = [
    {"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character not their color that matters"},
    {"id": 23058, "img": "img/23058.png", "label": 1, "text": "don't be afraid to love again"},
]


def test_hateful_memes_reads_labels_as_yes_no(tmp_path):
    for meme in MEMES:
        touch(tmp_path / "hm" / meme["img"])
    path = write_jsonl(tmp_path / "hm" / "dev_seen.jsonl", MEMES)
    expected = [
        Example(
            "42953", ImageRef(path=str(tmp_path / "hm" / "img" / "42953.png")), {"text": MEMES[0]["text"]}, ("no",), 0
        ),
        Example(
            "23058", ImageRef(path=str(tmp_path / "hm" / "img" / "23058.png")), {"text": MEMES[1]["text"]}, ("yes",), 1
        ),
    ]
    assert hateful_memes(path, tmp_path / "hm") == expected
    assert hateful_memes(path, tmp_path / "hm" / "img") == expected  # image_dir may be the img folder itself


def test_hateful_memes_errors_name_the_file_and_the_line(tmp_path):
    for meme in MEMES:
        touch(tmp_path / meme["img"])
    unlabeled = [{k: v for k, v in m.items() if k != "label"} for m in MEMES]
    path = write_jsonl(tmp_path / "test_unseen.jsonl", unlabeled)
    with pytest.raises(
        ValueError, match=r"test_unseen\.jsonl:1 \(id 42953\): missing field 'label' \(evaluation needs labels"
    ):
        hateful_memes(path, tmp_path)
    write_jsonl(path, [MEMES[0], {**MEMES[1], "img": "img/404.png"}])
    with pytest.raises(ValueError, match=r"test_unseen\.jsonl:2 \(id 23058\): image file .*404\.png does not exist"):
        hateful_memes(path, tmp_path)
    write_jsonl(path, [{**MEMES[0], "label": 2}])
    with pytest.raises(ValueError, match=r":1 \(id 42953\): label must be 0 or 1, got 2"):
        hateful_memes(path, tmp_path)
    path.write_text(json.dumps(MEMES[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"test_unseen\.jsonl:2: not valid json"):
        hateful_memes(path, tmp_path)
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"test_unseen\.jsonl: no memes found"):
        hateful_memes(path, tmp_path)
    with pytest.raises(ValueError, match=r"train\.jsonl: no such file"):
        hateful_memes(tmp_path / "train.jsonl", tmp_path)


# ---------------------------------------------------------------------------------------------
# ImageNet-style folders

SYNSETS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def imagenet_val(tmp_path: Path) -> Path:
    """Two of three classes have images in this split; a stray file is not an image."""
    touch(tmp_path / "val" / "n01443537" / "ILSVRC2012_val_00000002.JPEG")
    touch(tmp_path / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG")
    touch(tmp_path / "val" / "n01440764" / "notes.txt")
    write_json(tmp_path / "classnames.json", SYNSETS)
    return tmp_path / "val"


def test_image_folder_maps_synsets_to_class_names(tmp_path):
    root = imagenet_val(tmp_path)
    options = ("tench", "goldfish", "great white shark")
    assert image_folder(root, tmp_path / "classnames.json") == [
        Example(
            "val/n01440764/ILSVRC2012_val_00000001.JPEG",
            ImageRef(path=str(root / "n01440764" / "ILSVRC2012_val_00000001.JPEG")),
            answers=("tench",),
            options=options,
        ),
        Example(
            "val/n01443537/ILSVRC2012_val_00000002.JPEG",
            ImageRef(path=str(root / "n01443537" / "ILSVRC2012_val_00000002.JPEG")),
            answers=("goldfish",),
            options=options,
        ),
    ]


def test_image_folder_names_classes_by_folder_or_by_a_list(tmp_path):
    touch(tmp_path / "test" / "mepen" / "00000.png")
    touch(tmp_path / "test" / "badus" / "00000.png")
    by_folder = image_folder(tmp_path / "test")
    assert [(e.id, e.answers, e.options) for e in by_folder] == [
        ("test/badus/00000.png", ("badus",), ("badus", "mepen")),
        ("test/mepen/00000.png", ("mepen",), ("badus", "mepen")),
    ]
    names = write_json(tmp_path / "classnames.json", ["mepen", "lirik", "badus"])
    assert [e.options for e in image_folder(tmp_path / "test", names)] == [("mepen", "lirik", "badus")] * 2


def test_image_folder_errors(tmp_path):
    root = imagenet_val(tmp_path)
    with pytest.raises(ValueError, match=r"no such directory"):
        image_folder(tmp_path / "train")
    partial = write_json(tmp_path / "partial.json", {"n01440764": "tench"})
    with pytest.raises(ValueError, match=r"class folder\(s\) \['n01443537'\] are not named in .*partial\.json"):
        image_folder(root, partial)
    twice = write_json(tmp_path / "twice.json", {"n01440764": "crane", "n01443537": "crane"})
    with pytest.raises(ValueError, match=r"twice\.json: class names must be distinct .*\['crane'\]"):
        image_folder(root, twice)
    (tmp_path / "empty" / "n01440764").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty: no images in class folders found"):
        image_folder(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Multiple choice

ITEMS = [
    {
        "id": "5",
        "image": "train/5/image.png",
        "question": "Which is a mammal?",
        "choices": ["trout", "otter"],
        "answer": 1,
    },
    {"id": "6", "question": "Which is colder?", "choices": ["ice", "tea", "soup"], "answer": "ice"},
    {"id": "7", "image": "train/7/image.png", "question": "Which word?", "choices": ["B", "A"], "answer": "A"},
]


def test_multiple_choice_options_are_letters_and_the_answer_is_one(tmp_path):
    touch(tmp_path / "train" / "5" / "image.png")
    touch(tmp_path / "train" / "7" / "image.png")
    path = write_jsonl(tmp_path / "train.jsonl", ITEMS)
    image = ImageRef(path=str(tmp_path / "train" / "5" / "image.png"))
    first = Example(
        "5", image, {"question": "Which is a mammal?", "choices": "A. trout\nB. otter"}, ("B",), options=("A", "B")
    )
    second = Example(
        "6",
        None,
        {"question": "Which is colder?", "choices": "A. ice\nB. tea\nC. soup"},
        ("A",),
        options=("A", "B", "C"),
    )
    examples = multiple_choice(path)
    assert examples[:2] == [first, second]
    assert examples[2].answers == ("B",)  # the text of a choice wins over a letter
    assert [e.id for e in multiple_choice(path, tmp_path, image_only=True)] == ["5", "7"]


def test_multiple_choice_errors_name_the_file_and_the_line(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [ITEMS[1], {**ITEMS[1], "id": "9", "answer": 3}])
    with pytest.raises(ValueError, match=r"test\.jsonl:2 \(id 9\): answer 3 is neither an index, a letter nor"):
        multiple_choice(path)
    write_jsonl(path, [{k: v for k, v in ITEMS[1].items() if k != "choices"}])
    with pytest.raises(ValueError, match=r"test\.jsonl:1 \(id 6\): missing field 'choices'"):
        multiple_choice(path)
    write_jsonl(path, [ITEMS[0]])
    with pytest.raises(ValueError, match=r"test\.jsonl:1 \(id 5\): image file .*image\.png does not exist"):
        multiple_choice(path)
    write_jsonl(path, [ITEMS[1]])
    with pytest.raises(ValueError, match=r"test\.jsonl: no items with an image found"):
        multiple_choice(path, image_only=True)


# ---------------------------------------------------------------------------------------------
# Task files


def load_spec(name: str) -> TaskSpec:
    return parse_task(task_file(name))


def test_every_builtin_task_file_is_a_task_spec():
    assert set(TASKS) == {
        "coco", "flickr30k", "vqav2", "okvqa", "vizwiz", "textvqa", "hateful_memes", "imagenet", "scienceqa",
        "tinyworld_caption", "tinyworld_vqa", "tinyworld_classification",
    }  # fmt: skip
    fields = {"name", "reader", "query", "support", "template", "answer_mode", "candidates", "fixed_candidates"}
    fields |= {"metric", "max_new_tokens", "num_beams", "stop_strings"}
    for name in TASKS:
        data = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
        assert fields <= set(data) <= {f.name for f in dataclasses.fields(TaskSpec)}, name
        spec = load_spec(name)
        assert isinstance(spec, TaskSpec) and spec.name == name and spec.reader in READERS
        assert spec.template.startswith("<image>") and spec.template.endswith("{answer}<|endofchunk|>")


def test_builtin_tasks_follow_openflamingo_prompts_and_settings():
    assert load_spec("coco").template == "<image>Output:{answer}<|endofchunk|>"
    assert load_spec("vqav2").template == "<image>Question:{question} Short answer:{answer}<|endofchunk|>"
    hm = load_spec("hateful_memes")
    assert (
        hm.template == "<image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}<|endofchunk|>"
    )
    assert (hm.answer_mode, hm.candidates, hm.fixed_candidates, hm.metric) == (
        "rank",
        "fixed",
        ("no", "yes"),
        "roc_auc",
    )
    for name in ("coco", "flickr30k"):
        assert (load_spec(name).max_new_tokens, load_spec(name).num_beams, load_spec(name).metric) == (20, 3, "cider")
    for name in ("vqav2", "okvqa", "vizwiz", "textvqa"):
        assert (load_spec(name).max_new_tokens, load_spec(name).num_beams) == (5, 3)
    assert load_spec("okvqa").metric == "okvqa"
    assert (load_spec("imagenet").answer_mode, load_spec("imagenet").candidates) == ("rank", "options")


def test_a_task_name_that_does_not_exist_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'cocoa'; built-in tasks: coco, flickr30k, .*vqav2"):
        load_task("cocoa", "/data")
    with pytest.raises(ValueError, match=r"task file .*nope\.yaml does not exist"):
        load_task("nope.yaml", "/data")


def test_builtin_tasks_need_a_root(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"coco\.yaml: support\.path: '\{root\}/coco/dataset_coco\.json' lies under the data root; pass root",
    ):
        load_task("coco")
    with pytest.raises(ValueError, match=r"dataset_coco\.json: no such file"):
        load_task("coco", tmp_path)


def user_task(tmp_path: Path, **changes) -> Path:
    data = {
        "name": "my_captions",
        "reader": "karpathy",
        "query": {"path": "{root}/coco/dataset_coco.json", "image_dir": "{root}/coco", "split": ["train", "restval"]},
        "support": {"path": "{root}/coco/dataset_coco.json", "image_dir": "{root}/coco", "split": "train"},
        "template": "<image>Caption:{answer}<|endofchunk|>",
        "metric": "cider",
        **changes,
    }
    path = tmp_path / "my_task.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def test_a_user_task_file_loads_with_its_root(tmp_path):
    coco_karpathy(tmp_path)
    spec, support, query = load_task(str(user_task(tmp_path)), tmp_path)
    assert (spec.name, spec.template, spec.answer_mode) == (
        "my_captions",
        "<image>Caption:{answer}<|endofchunk|>",
        "generate",
    )
    assert [e.id for e in support] == ["9"] and [e.id for e in query] == ["9", "42"]
    spec, support, query = load_task(user_task(tmp_path, support={}), tmp_path)
    assert support == [] and len(query) == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prompt": "x"}, r"my_task\.yaml: <root>: unknown key 'prompt'"),
        ({"reader": None}, r"my_task\.yaml: missing field 'reader'"),
        ({"reader": "coco"}, r"my_task\.yaml: (query|support): unknown reader 'coco'; known readers: karpathy, vqa"),
        (
            {"support": {"path": "x.json", "split": "train", "images": "y"}},
            r"support: arguments do not fit reader 'karpathy'",
        ),
        ({"metric": "bleu"}, r"my_task\.yaml: metric: expected one of"),
        (
            {"template": "<image>Output:<|endofchunk|>"},
            r"my_task\.yaml: <root>: task my_captions: the template must contain",
        ),
        ({"template": "<image>{question}:{answer}"}, r"support: example '9' lacks template field\(s\) \['question'\]"),
        ({"answer_mode": "rank"}, r"support: example '9' has no options to rank"),
        ({"answer_mode": "rank", "candidates": "fixed"}, r"candidates 'fixed' needs fixed_candidates"),
    ],
)
def test_bad_task_files_are_errors_naming_the_key(tmp_path, changes, message):
    coco_karpathy(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_task(user_task(tmp_path, **changes), tmp_path)


# ---------------------------------------------------------------------------------------------
# The tiny world's tasks, end to end

N_EVAL = 25  # five per class


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tinyworld")
    tinyworld.write(root, n_train=400, n_eval=N_EVAL)
    return root


@pytest.fixture(scope="module")
def training_texts(world) -> set[str]:
    """Every text of the tiny world's interleaved, task and in-context training documents."""
    with (world / "train" / "mmc4" / "docs.jsonl").open() as f:
        return {text for line in f for text in json.loads(line)["text_list"]}


def plain(text: str) -> str:
    return text.replace("<image>", "").replace("<|endofchunk|>", "")


def frame(spec: TaskSpec) -> re.Pattern:
    """The template as a pattern over plain text; every field and the answer start and end with a
    non-space, so a match also proves the spacing around them."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(plain(spec.template)):
        parts.append(re.escape(literal))
        if name:
            parts.append(rf"(?P<{name}>\S(?:.*?\S)?)")
    return re.compile("".join(parts))


def demonstration_answer(example: Example) -> str:
    """The most common reference: the tiny world's canonical answer or caption."""
    return Counter(example.answers).most_common(1)[0][0]


@pytest.mark.parametrize("name", ["tinyworld_caption", "tinyworld_vqa", "tinyworld_classification"])
def test_tinyworld_tasks_load_and_render_as_the_training_documents_write(world, training_texts, name):
    spec, support, query = load_task(name, world)
    assert len(support) == len(query) == N_EVAL
    assert {e.id for e in support}.isdisjoint(e.id for e in query)
    assert all(Path(e.image.path).is_file() for e in support + query)
    pattern = frame(spec)
    trained = [m for m in map(pattern.fullmatch, training_texts) if m]
    assert trained, f"no training text has the form of {spec.template!r}"
    for match in trained[:50]:  # the template rewrites a training text exactly from its parts
        fields = {k: v for k, v in match.groupdict().items() if k != "answer"}
        assert plain(spec.demonstration(Example("t", None, fields, answers=(match["answer"],)))) == match.string
    for example in support:
        answer = demonstration_answer(example)
        assert spec.demo_answer_of(example) == answer
        text = plain(spec.demonstration(example))
        assert pattern.fullmatch(text)["answer"] == answer
        assert text == plain(spec.query_text(example)) + spec.answer_prefix + answer


def test_tinyworld_vqa_demonstrations_occur_verbatim_in_training(world, training_texts):
    """Held-out pictures, but some questions and answers (counts, sizes) are also asked in training;
    captions and class names are held out entirely, so only VQA can match word for word."""
    spec, support, _ = load_task("tinyworld_vqa", world)
    rendered = {plain(spec.demonstration(e)) for e in support}
    assert rendered & training_texts
    assert plain(spec.template) == tinyworld.VQA_PROMPT + " {answer}"
    assert plain(load_spec("tinyworld_caption").template) == tinyworld.OUTPUT_PROMPT + " {answer}"


def test_tinyworld_classification_ranks_the_invented_class_names(world):
    _, support, query = load_task("tinyworld_classification", world)
    names = tuple(json.loads((world / "eval" / "classification" / "classnames.json").read_text()))
    assert all(e.options == names and e.answers[0] in names for e in support + query)
    counts = Counter(e.answers[0] for e in query)
    assert set(counts) == set(names) and max(counts.values()) - min(counts.values()) <= 1, "balanced classes"
