import pytest

from edgelmm.tasks import choice_accuracy, exact_match, extract_choice, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Red. ", "red"),
        ("The Circle!", "circle"),
        ("top-left", "top left"),
        ("a red circle at the top left, a blue square at the center.", "red circle at top left blue square at center"),
        ("An apple\n\tpie", "apple pie"),
        ("theater", "theater"),  # only whole-word articles go
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("The red one.", "red one") == 1.0
    assert exact_match("Yes", "yes") == 1.0
    assert exact_match("3", "three") == 0.0
    assert exact_match("red circle", "red") == 0.0


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(C) a dog", "C"),
        ("D.", "D"),
        ("The answer is B.", "B"),
        ("Answer: A", "A"),
        ("I think it is C", "C"),  # "I" is not an option
        ("At first glance, none", None),  # capitals inside words do not count
        ("E", None),  # not an option
        ("", None),
    ],
)
def test_extract_choice(output, expected):
    assert extract_choice(output, "ABCD") == expected


def test_choice_accuracy_uses_the_first_letter():
    assert choice_accuracy("B, not C", "B", "ABCD") == 1.0
    assert choice_accuracy("C, not B", "B", "ABCD") == 0.0
    assert choice_accuracy("b", "b", "ABCD") == 1.0
