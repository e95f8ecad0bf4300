"""Policy files: what they hold, and one clear line for each way they can be wrong."""

from __future__ import annotations

import pytest

from edgelmm.collab.policy import Policy, load_policy, save_policy
from edgelmm.errors import EdgelmmError


def test_modes_and_round_trip(tmp_path):
    assert load_policy("edge").mode == "edge" and load_policy(None) == Policy()
    policy = Policy(strategy="temperature(temperature=1.5)", threshold=0.4, fitted={"cloud_share": 0.2})
    save_policy(policy, tmp_path / "p.yaml")
    assert load_policy(tmp_path / "p.yaml") == policy
    assert policy.escalates(0.3) and not policy.escalates(0.5)
    assert Policy(mode="escalate").escalates(1.0) and not Policy(mode="edge").escalates(0.0)


@pytest.mark.parametrize("text, message", [
    ("threshold: 1.5\n", "'threshold': Input should be less than or equal to 1"),
    ("strategy: entropie\n", "unknown confidence strategy 'entropie'"),
    ("mode: sometimes\n", "'mode': Input should be"),
    ("strategy: [unclosed\n", "does not parse"),
    ("- a list\n", "holds a mapping"),
])
def test_bad_policy_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(EdgelmmError, match=message):
        load_policy(path)


def test_neither_file_nor_mode():
    with pytest.raises(EdgelmmError, match="neither a file nor a mode"):
        load_policy("no-such-policy.yaml")
