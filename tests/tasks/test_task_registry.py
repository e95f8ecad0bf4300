import pytest

from edgelmm.config import TaskSpec
from edgelmm.demo.shapes import TRAIN_SEED_BASE, VQA_KINDS
from edgelmm.errors import EdgelmmError
from edgelmm.registry import TASKS
from edgelmm.tasks import Task, TaskSample, available_tasks, get_task, register_task


def test_builtin_tasks_are_registered():
    assert {"shapes-vqa", "shapes-caption", "vqa-jsonl", "mc-jsonl"} <= set(available_tasks())


def test_shapes_vqa_samples_are_deterministic_and_balanced():
    task = get_task("shapes-vqa")
    a, b = task.samples(10, seed=3), task.samples(10, seed=3)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.reference for s in a] == [s.reference for s in b]
    assert [s.kind for s in a] == list(VQA_KINDS) * 2
    assert all(len(s.images) == 1 and s.images[0].size == (96, 96) for s in a)
    assert task.score(f" {a[0].reference.upper()}. ", a[0]) == 1.0
    assert task.score("nothing", a[0]) == 0.0


def test_shapes_caption_scores_the_whole_caption():
    task = get_task(TaskSpec(name="shapes-caption"))
    sample = task.samples(1, seed=0)[0]
    assert sample.prompt == "Describe the image."
    assert task.score(sample.reference, sample) == 1.0
    assert task.score(sample.reference.split(",")[0] + " and more", sample) == 0.0


def test_shapes_refuses_training_seeds():
    with pytest.raises(EdgelmmError, match="not an evaluation seed"):
        get_task("shapes-vqa").samples(2, seed=TRAIN_SEED_BASE)


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(EdgelmmError, match=r"unknown task 'nope'.*shapes-vqa"):
        get_task("nope")


def test_path_rules():
    with pytest.raises(EdgelmmError, match="needs a file"):
        get_task("vqa-jsonl")
    with pytest.raises(EdgelmmError, match="reads no file"):
        get_task(TaskSpec(name="shapes-vqa", path="x.jsonl"))


def test_a_new_task_plugs_in_by_name():
    @register_task("echo-test")
    class Echo(Task):
        def samples(self, n, seed=0):
            return [TaskSample(id=str(i), prompt=f"say {i}", reference=str(i)) for i in range(n)]

        def score(self, output, sample):
            return float(output == sample.reference)

    try:
        task = get_task("echo-test")
        assert task.label == "echo-test"
        assert [task.score(s.reference, s) for s in task.samples(3)] == [1.0, 1.0, 1.0]
    finally:
        del TASKS._entries["echo-test"]
