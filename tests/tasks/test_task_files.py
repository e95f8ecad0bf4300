import json

import pytest
from PIL import Image

from edgelmm.config import TaskSpec
from edgelmm.errors import EdgelmmError
from edgelmm.tasks import get_task


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def data(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "imgs" / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "imgs" / "blue.png")
    return tmp_path


def task(name, path):
    return get_task(TaskSpec(name=name, path=str(path)))


def test_vqa_jsonl_reads_images_relative_to_the_file(data, tmp_path, monkeypatch):
    path = write_jsonl(data / "qa.jsonl", [
        {"image": "imgs/red.png", "question": "What color?", "answer": "Red", "category": "color"},
        "",  # blank lines are skipped
        {"image": "imgs/blue.png", "question": "What color?", "answer": "blue"},
        {"question": "How many legs has a cat?", "answer": 4},  # text only; numbers are answers too
    ])
    monkeypatch.chdir(tmp_path.parent)  # paths must not depend on the working directory
    t = task("vqa-jsonl", path)
    assert t.label == "vqa-jsonl:qa"
    samples = t.samples(10)
    assert [s.reference for s in samples] == ["Red", "blue", "4"]
    assert samples[0].images[0].getpixel((0, 0)) == (255, 0, 0)
    assert samples[2].images == []
    assert samples[0].kind == "color" and samples[1].kind is None
    assert [s.id for s in samples] == ["1", "3", "4"]  # line numbers
    assert t.score("red.", samples[0]) == 1.0 and t.score("blue", samples[0]) == 0.0
    assert len(t.samples(2)) == 2  # the first n lines


def test_mc_jsonl_prompt_lists_letters_and_scores_the_letter(data):
    path = write_jsonl(data / "mc.jsonl", [
        {"image": "imgs/red.png", "question": "Which color?", "options": ["red", "blue"], "answer": "A"},
        {"question": "2+2?", "options": {"B": "4", "A": "3", "C": "5"}, "answer": "b"},
    ])
    first, second = task("mc-jsonl", path).samples(5)
    assert first.prompt.splitlines()[:3] == ["Which color?", "A. red", "B. blue"]
    assert "letter" in first.prompt.splitlines()[-1]
    assert second.prompt.splitlines()[1:4] == ["A. 3", "B. 4", "C. 5"]
    assert second.reference == "B"
    t = task("mc-jsonl", path)
    assert t.score("B. 4", second) == 1.0
    assert t.score("The answer is (A)", second) == 0.0
    assert t.score("D", second) == 0.0  # not an option of this question


@pytest.mark.parametrize(
    ("name", "lines", "match"),
    [
        ("vqa-jsonl", ['{"question": "q", "answer": "a"}', "{not json"], r"bad\.jsonl:2: invalid JSON"),
        ("vqa-jsonl", ['["a list"]'], r"bad\.jsonl:1: expected a JSON object"),
        ("vqa-jsonl", [{"question": "q"}], r"bad\.jsonl:1: 'answer' must be a non-empty string"),
        ("vqa-jsonl", [{"question": "q", "answer": "a"}, {"image": "imgs/none.png", "question": "q", "answer": "a"}],
         r"bad\.jsonl:2: image not found: .*none\.png"),
        ("mc-jsonl", [{"question": "q", "options": ["x"], "answer": "A"}], r"bad\.jsonl:1: 'options' must be"),
        ("mc-jsonl", [{"question": "q", "options": ["x", "y"], "answer": "C"}], r"bad\.jsonl:1: answer 'C' is not one of"),
    ],
)
def test_bad_lines_name_the_file_and_line(data, name, lines, match):
    path = write_jsonl(data / "bad.jsonl", lines)
    with pytest.raises(EdgelmmError, match=match):
        task(name, path)


def test_corrupt_image_names_the_line(data):
    (data / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = write_jsonl(data / "qa.jsonl", [
        {"image": "imgs/red.png", "question": "q", "answer": "a"},
        {"image": "imgs/broken.png", "question": "q", "answer": "a"},
    ])
    t = task("vqa-jsonl", path)
    assert len(t.samples(1)) == 1  # only the images asked for are decoded
    with pytest.raises(EdgelmmError, match=r"qa\.jsonl:2: cannot read image .*broken\.png"):
        t.samples(2)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(EdgelmmError, match="task file not found"):
        task("vqa-jsonl", tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EdgelmmError, match="no samples"):
        task("vqa-jsonl", tmp_path / "empty.jsonl")
