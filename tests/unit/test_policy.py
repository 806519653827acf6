import pytest

from coordinator import policy
from mesh.errors import PolicyError


def test_shipped_policies_load() -> None:
    p = policy.load()
    release = p.get("release.proposed")
    assert release is not None
    assert len(release.skills) == 3
    assert p.decision_type("release.proposed") == "release.decided"


def _one(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"skills": ["a", "b"], "rule": {"kind": "majority"}}
    body.update(overrides)
    return {"x.happened": body}


def test_default_decision_type_is_derived() -> None:
    assert policy.parse(_one()).decision_type("x.happened") == "x.decided"


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"skils": ["a"]}, "skils"),
        ({"rule": {"kind": "k_of_n"}}, "k"),
        ({"rule": {"kind": "plurality"}}, "kind"),
        ({"rule": {"kind": "majority", "vetoes": ["zed"]}}, "zed"),
        ({"agent_timeout_s": 5, "deadline_s": 1}, "deadline_s"),
        ({"skills": []}, "skill"),
        ({"timeout_counts_as": "maybe"}, "timeout_counts_as"),
    ],
)
def test_bad_policy_is_a_clear_error(overrides: dict[str, object], words: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy.parse(_one(**overrides))
    assert "x.happened" in str(err.value)
    assert words in str(err.value)
