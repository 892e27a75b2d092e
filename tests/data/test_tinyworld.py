"""The tiny world: pictures show what their scene says, the text is right, the in-context
documents follow one rule each, the held-out split is disjoint from training, and the written
files follow the field's layouts, read back by the same readers, byte-identical per seed."""

import hashlib
import json
import random
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from interleaf.data import tinyworld as tw
from interleaf.data.formats import read_llava, read_mmc4, read_pairs_parquet
from interleaf.data.schema import decode_image

N_DOCS = 300
N_WRITE, N_EVAL = 80, 10


@pytest.fixture(scope="module")
def docs():
    return list(tw.iter_train_documents(seed=0, n=N_DOCS))


@pytest.fixture(scope="module")
def tasks():
    return tw.eval_tasks(seed=0, n=20, n_support=15)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyworld") / "world"
    return root, tw.write(root, seed=0, n_train=N_WRITE, n_eval=N_EVAL)


def scenes(doc):
    return [tw.Scene.from_dict(image.meta["scene"]) for image in doc.images]


def examples(doc):
    """(scene, answer) of each image of an in-context document."""
    answers = [s.text.removeprefix(tw.OUTPUT_PROMPT + " ") for s in doc.segments if s.text is not None]
    return list(zip(scenes(doc), answers))


def segment_view(doc):
    """Texts, roles and image bytes: what a reader must reproduce."""
    view = []
    for s in doc.segments:
        image = None if s.image is None else s.image.data or Path(s.image.path).read_bytes()
        view.append((s.text, image, s.role))
    return view


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# Pictures and text


@pytest.mark.parametrize("size", [32, 48, 64])
@pytest.mark.parametrize("shape", tw.SHAPES)
def test_render_draws_each_thing_in_its_colour_at_its_place(size, shape):
    rng = random.Random(shape)
    for position in tw.POSITIONS:
        colour = rng.choice(list(tw.COLOURS))
        thing = tw.Thing(shape, colour, "large", position, (rng.uniform(-1, 1), rng.uniform(-1, 1)))
        scene = tw.Scene((thing,), background="brown", style="noise", texture_seed=rng.getrandbits(32))
        image = decode_image(tw.png_bytes(tw.render(scene, size)))
        x, y, _ = tw.centre(thing, size)
        assert image.size == (size, size)
        assert image.getpixel((int(x), int(y))) == tw.COLOURS[colour], (position, colour)
        corner = (size - 1, size - 1) if position == "top left" else (0, 0)
        background = tw.BACKGROUNDS["brown"]
        assert all(abs(a - b) <= 14 for a, b in zip(image.getpixel(corner), background))


def test_large_things_are_larger_and_rendering_is_deterministic():
    def area(size_name):
        scene = tw.Scene((tw.Thing("circle", "red", size_name, "center"),), texture_seed=3)
        image = tw.render(scene)
        return sum(n for n, colour in image.getcolors(image.width * image.height) if colour == tw.COLOURS["red"])

    assert area("large") > 2.5 * area("small") > 0
    scene = tw.random_scene(random.Random(0))
    assert tw.png_bytes(tw.render(scene)) == tw.png_bytes(tw.render(scene))
    assert tw.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_caption_and_questions_describe_the_scene():
    scene = tw.Scene(
        (
            tw.Thing("circle", "red", "small", "top left"),
            tw.Thing("square", "blue", "large", "top right"),
            tw.Thing("square", "blue", "large", "bottom right"),
        ),
        background="grey",
    )
    assert tw.caption(scene) == "a small red circle and two large blue squares on a grey background."
    assert "a red circle at the top left and two blue squares." in tw.reference_captions(scene)
    answers = {qa.question: qa.answer for qa in tw.questions(scene)}
    assert answers["what color is the circle?"] == "red"
    assert answers["what color are the squares?"] == "blue"
    assert answers["what shape is the red object?"] == "circle"
    assert answers["how many squares are there?"] == "2"
    assert answers["how many shapes are there?"] == "3"
    assert answers["where is the red circle?"] == "top left"
    assert answers["what size is the circle?"] == "small"
    assert answers["what color is the background?"] == "grey"
    assert answers["is there a triangle?"] == "no"
    assert answers["is there a blue square?"] == "yes"
    assert answers["is there a green square?"] == "no"
    assert "where is the blue square?" not in answers  # two of them: ambiguous, so not asked


def test_ambiguous_questions_are_not_asked():
    scene = tw.Scene((tw.Thing("circle", "red", "small", "top left"), tw.Thing("circle", "blue", "large", "center")))
    asked = {qa.question for qa in tw.questions(scene)}
    assert "what color is the circle?" not in asked
    assert {"what shape is the red object?", "how many circles are there?"} <= asked


# ---------------------------------------------------------------------------------------------
# Training documents


def test_train_documents_are_deterministic_per_seed(docs):
    assert list(tw.iter_train_documents(seed=0, n=40)) == docs[:40]
    other = list(tw.iter_train_documents(seed=1, n=40))
    assert [d.segments for d in other] != [d.segments for d in docs[:40]]


def test_every_kind_is_made_and_each_image_precedes_its_text(docs):
    kinds = Counter(doc.meta["kind"] for doc in docs)
    assert set(kinds) == set(tw.DEFAULT_MIX)
    for doc in docs:
        if doc.is_chat:
            assert doc.segments[0].image is not None and doc.segments[0].role == "user"
            roles = [s.role for s in doc.segments[1:]]
            assert roles == ["user", "assistant"] * (len(roles) // 2)
            continue
        for segment, following in zip(doc.segments, [*doc.segments[1:], None]):
            if segment.image is not None:
                assert following is not None and following.text is not None, doc.id


def test_images_show_their_scene_and_no_held_out_combination(docs):
    for doc in docs:
        for scene in scenes(doc):
            assert not scene.combos() & tw.HELD_OUT, doc.id
    image = docs[0].images[0]
    assert image.data == tw.png_bytes(tw.render(tw.Scene.from_dict(image.meta["scene"])))


def test_in_context_documents_follow_one_rule_each_and_it_changes(docs):
    icl = [doc for doc in docs if doc.meta["kind"] == "icl"]
    attributes = Counter(d.meta["attribute"] for d in icl if d.meta["rule"] == "attribute")
    granularities = Counter(d.meta["granularity"] for d in icl if d.meta["rule"] == "words")
    assert set(attributes) == set(tw.ATTRIBUTES) and set(granularities) == set(tw.GRANULARITIES)
    words_for: dict[str, set[str]] = {}
    for doc in icl:
        pairs = examples(doc)
        assert tw.ICL_EXAMPLES[0] <= len(pairs) <= tw.ICL_EXAMPLES[1]
        for scene, answer in pairs:
            kinds = {(t.shape, t.colour, t.size) for t in scene.things}
            assert len(kinds) == 1, "one kind of thing per image: every attribute is unambiguous"
            shape, colour, size = kinds.pop()
            if doc.meta["rule"] == "attribute":
                truth = {"colour": colour, "shape": shape, "count": str(len(scene.things)), "size": size}
                assert answer == truth[doc.meta["attribute"]], doc.id
            else:
                label = {"shape": shape, "colour": colour, "object": f"{colour} {shape}"}[doc.meta["granularity"]]
                assert doc.meta["binding"][answer] == label, doc.id
                words_for.setdefault(label, set()).add(answer)
        if doc.meta["rule"] == "words":
            shown = Counter(answer for _, answer in pairs)
            assert 2 <= len(shown) <= 3 and min(shown.values()) >= 2, "bursty: few classes, each repeated"
            assert pairs[-1][1] in [answer for _, answer in pairs[:-1]], "the last word is shown earlier"
    assert max(len(words) for words in words_for.values()) >= 3, "a class gets a new word in each document"


@pytest.mark.parametrize("kind", ["icl_words", "icl_attribute", *(f"icl_{g}_words" for g in tw.GRANULARITIES)])
def test_single_rule_kinds_give_only_their_rule(kind):
    docs = list(tw.iter_train_documents(seed=3, n=12, mix={kind: 1.0}))
    rules = {d.meta["rule"] for d in docs}
    assert rules == {"attribute" if kind == "icl_attribute" else "words"}
    assert {d.meta["kind"] for d in docs} == {kind}
    if kind.endswith("_words") and kind != "icl_words":
        assert {d.meta["granularity"] for d in docs} == {kind.split("_")[1]}


@pytest.mark.parametrize("granularity", [None, *tw.GRANULARITIES])
def test_bursty_documents_are_long_and_only_matching_names_a_picture(granularity):
    kind = "icl_bursty" if granularity is None else f"icl_bursty_{granularity}"
    docs = list(tw.iter_train_documents(seed=5, n=60, mix={kind: 1.0}))
    classes, lengths, latest_right = Counter(), Counter(), []
    for doc in docs:
        assert doc.meta["bursty"] and doc.meta["rule"] == "words"
        if granularity is not None:
            assert doc.meta["granularity"] == granularity
        pairs = examples(doc)
        lengths[len(pairs)] += 1
        shown = Counter(answer for _, answer in pairs)
        classes[len(shown)] += 1
        assert tw.BURSTY_EXAMPLES[0] <= len(pairs) <= tw.BURSTY_EXAMPLES[1]
        assert min(shown.values()) >= 2 and set(shown) == set(doc.meta["binding"]), doc.id
        assert set(shown) <= set(tw.TRAIN_WORDS)
        for scene, answer in pairs:
            (thing,) = {(t.shape, t.colour) for t in scene.things}
            label = {"shape": thing[0], "colour": thing[1], "object": f"{thing[1]} {thing[0]}"}[doc.meta["granularity"]]
            assert doc.meta["binding"][answer] == label, doc.id
        latest_right += [b == a for (_, a), (_, b) in pairwise(pairs)]
    most = min(tw.BURSTY_CLASSES, len(tw.SHAPES) if granularity == "shape" else tw.BURSTY_CLASSES)
    assert min(classes) == 2 and max(classes) == most, "from two to six words bound (five shapes)"
    assert max(lengths) - min(lengths) >= 6, "lengths spread over 8-16 examples"
    # repeating the previous word is right about as often as chance among the bound words, not
    # usually (the shortcut a bursty document must not reward)
    assert sum(latest_right) / len(latest_right) < 0.45


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ({"icl_bursty_color": 1.0}, "unknown document kind 'icl_bursty_color'; the kinds are .*icl_bursty_colour"),
        ({"pair": 1.0, "nope": 0.0}, "unknown document kind 'nope'"),
        ({}, "no kind has a weight > 0"),
        ({"pair": 0.0}, "no kind has a weight > 0"),
        ({"pair": -1.0, "icl": 1.0}, "weight -1.0 of 'pair' is not a number >= 0"),
    ],
)
def test_a_bad_mix_is_refused_when_called_naming_the_kind(mix, message):
    with pytest.raises(ValueError, match=f"mix: {message}"):
        tw.iter_train_documents(seed=0, n=3, mix=mix)  # before any document is drawn


def test_the_world_documents_are_unchanged_by_the_bursty_builder():
    """_word_document and _bursty_document share their example writer; the world's own documents
    (VERSION 2) must come out as before: a fixed digest of the first documents' words and scenes."""
    docs = list(tw.iter_train_documents(seed=0, n=40, mix={"icl_words": 1.0}))
    written = [s.text or s.image.meta["scene"] for d in docs for s in d.segments]
    assert hashlib.sha256(json.dumps(written, sort_keys=True).encode()).hexdigest()[:16] == "654a4b9aead6c922"


def test_word_classes_are_zipf_distributed():
    rng = random.Random(0)
    items = [f"class{i}" for i in range(25)]
    counts = Counter(tw._zipf_sample(rng, items, 1)[0] for _ in range(4000))
    assert counts["class0"] > 2 * counts["class2"] > 3 * counts["class24"] > 0


def test_eval_words_never_occur_in_training_text(docs, tasks):
    assert not set(tw.TRAIN_WORDS) & set(tw.EVAL_WORDS)
    text = " ".join(s.text for doc in docs for s in doc.segments if s.text is not None)
    vocabulary = set(text.replace(".", " ").replace("?", " ").replace(":", " ").split())
    assert not vocabulary & set(tasks["classification"].classnames)
    ordinary = {w for doc in docs if doc.meta["kind"] != "icl" for s in doc.segments if s.text for w in s.text.split()}
    bound = {word for doc in docs if doc.meta.get("rule") == "words" for word in doc.meta["binding"]}
    assert bound <= set(tw.TRAIN_WORDS) and not bound & ordinary


# ---------------------------------------------------------------------------------------------
# Held-out evaluation tasks


def test_eval_tasks_are_held_out_and_well_formed(tasks):
    assert {name: task.kind for name, task in tasks.items()} == {k: k for k in ("captioning", "vqa", "classification")}
    for task in tasks.values():
        assert (len(task.support), len(task.test)) == (15, 20)
        ids = [item.id for item in task.support + task.test]
        image_ids = [item.image_id for item in task.support + task.test]
        assert len(set(ids)) == len(ids) and len(set(image_ids)) == len(image_ids)
        for item in task.test:
            assert decode_image(item.image).size == (32, 32)
    for name in ("captioning", "vqa"):
        for item in tasks[name].support + tasks[name].test:
            assert tw.Scene.from_dict(item.meta["scene"]).combos() & tw.HELD_OUT, item.id
    assert all(len(item.answers) == 5 for item in tasks["captioning"].test)
    vqa = tasks["vqa"].test + tasks["vqa"].support
    for item in vqa:
        assert len(item.answers) == 10 and item.answers.count(item.meta["answer"]) >= 7
        assert item.prompt == tw.VQA_PROMPT.format(question=item.question)
    assert {"yes", "no"} <= {item.meta["answer"] for item in vqa}


def test_classification_names_colours_with_new_words_in_balanced_classes(tasks):
    task = tasks["classification"]
    assert task.classnames == tw.eval_classnames(0) and set(task.classnames) <= set(tw.EVAL_WORDS)
    assert len(task.classnames) == len(tw.COLOURS)
    counts = Counter(item.answers[0] for item in task.test)
    assert set(counts) == set(task.classnames) and max(counts.values()) - min(counts.values()) <= 1
    for item in task.test + task.support:
        (thing,) = tw.Scene.from_dict(item.meta["scene"]).things
        assert task.classnames[list(tw.COLOURS).index(thing.colour)] == item.answers[0]
        assert (thing.colour, thing.shape) in tw.TRAIN_COMBOS
        assert item.prompt == tw.OUTPUT_PROMPT


# ---------------------------------------------------------------------------------------------
# Files


def test_write_is_byte_identical_per_seed_and_cached(world, tmp_path):
    root, manifest = world
    again = tmp_path / "again"
    assert tw.write(again, seed=0, n_train=N_WRITE, n_eval=N_EVAL) == manifest
    assert digests(again) == digests(root)
    stamp = (again / "manifest.json").stat().st_mtime_ns
    assert tw.write(again, seed=0, n_train=N_WRITE, n_eval=N_EVAL) == manifest  # cached: nothing rewritten
    assert (again / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        tw.write(again, seed=1, n_train=N_WRITE, n_eval=N_EVAL)
    replaced = tw.write(again, seed=1, n_train=10, n_eval=2, overwrite=True)
    assert replaced["config"]["seed"] == 1 and replaced["sha256"] != manifest["sha256"]
    assert not (tmp_path / "again.staging").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tw.write(tmp_path / "other", n_train=5, n_eval=2, overwrite=True)


def test_manifest_counts_what_was_written(world):
    root, manifest = world
    assert manifest == json.loads((root / "manifest.json").read_text())
    assert sum(manifest["counts"]["train"].values()) == N_WRITE
    assert manifest["counts"]["train_images"] == sum(len(d.images) for d in tw.iter_train_documents(0, N_WRITE))
    assert manifest["counts"]["files"] == len(digests(root)) - 1
    assert manifest["classification"]["classnames"] == list(tw.eval_classnames(0))


def test_mmc4_file_reads_back_as_the_documents(world):
    root, _ = world
    lines = (root / "train/mmc4/docs.jsonl").read_text().splitlines()
    expected = [d for d in tw.iter_train_documents(0, N_WRITE) if d.meta["kind"] not in ("pair", "chat")]
    assert len(lines) == len(expected)
    for line in lines:
        record = json.loads(line)
        assert set(record) >= {"url", "text_list", "image_info", "similarity_matrix"}
        for info in record["image_info"]:
            assert set(info) == {"image_name", "raw_url", "matched_text_index", "matched_sim"}
            assert info["matched_sim"] == 1.0 and info["raw_url"].startswith("https://")
            assert record["similarity_matrix"][record["image_info"].index(info)][info["matched_text_index"]] == 1.0
    read = list(read_mmc4(root / "train/mmc4/docs.jsonl", image_root=root / "train/mmc4/images"))
    assert [segment_view(d) for d in read] == [segment_view(d) for d in expected]


def test_pairs_parquet_and_llava_json_read_back(world):
    root, _ = world
    documents = list(tw.iter_train_documents(0, N_WRITE))
    table = pq.read_table(root / "train/pairs.parquet")
    assert table.column_names == ["image", "caption", "url", "key"]
    assert [f.name for f in table.schema.field("image").type] == ["bytes", "path"]
    pairs = [d for d in documents if d.meta["kind"] == "pair"]
    read = list(read_pairs_parquet(root / "train/pairs.parquet"))
    assert [segment_view(d) for d in read] == [segment_view(d) for d in pairs]

    records = json.loads((root / "train/llava.json").read_text())
    for record in records:
        assert (root / "train/llava_images" / record["image"]).is_file()
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and "<image>" not in "".join(t["value"] for t in turns[1:])
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    chats = [d for d in documents if d.is_chat]
    read = list(read_llava(root / "train/llava.json", image_root=root / "train/llava_images"))
    assert [segment_view(d) for d in read] == [segment_view(d) for d in chats]


def test_eval_files_follow_the_karpathy_vqav2_and_imagenet_layouts(world):
    root, _ = world
    tasks = tw.eval_tasks(0, N_EVAL)
    karpathy = json.loads((root / "eval/captioning/dataset_tinyworld.json").read_text())
    assert Counter(image["split"] for image in karpathy["images"]) == {"train": N_EVAL, "test": N_EVAL}
    for image in karpathy["images"]:
        assert (root / "eval/captioning" / image["filepath"] / image["filename"]).is_file()
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]] and isinstance(image["cocoid"], int)
        for sentence in image["sentences"]:
            assert sentence["tokens"] == sentence["raw"].rstrip(".").split()

    for split, items in (("train", tasks["vqa"].support), ("test", tasks["vqa"].test)):
        questions = json.loads((root / f"eval/vqa/{split}_questions.json").read_text())["questions"]
        annotations = json.loads((root / f"eval/vqa/{split}_annotations.json").read_text())["annotations"]
        assert [q["question"] for q in questions] == [item.question for item in items]
        for question, annotation in zip(questions, annotations):
            assert (
                question["question_id"] == annotation["question_id"] and question["image_id"] == annotation["image_id"]
            )
            assert (root / f"eval/vqa/images/{question['image_id']:012d}.png").is_file()
            assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
            assert {"multiple_choice_answer", "answer_type", "question_type"} <= set(annotation)
            assert annotation["answer_type"] in ("yes/no", "number", "other")

    classification = root / "eval/classification"
    classnames = json.loads((classification / "classnames.json").read_text())
    assert classnames == list(tasks["classification"].classnames)
    for split in ("train", "test"):
        folders = sorted(p.name for p in (classification / split).iterdir())
        assert folders == sorted(classnames)
        files = list((classification / split).glob("*/*.png"))
        assert len(files) == N_EVAL and decode_image(files[0].read_bytes()).size == (32, 32)
