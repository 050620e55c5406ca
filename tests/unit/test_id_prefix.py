"""Identifiers given by a unique prefix: one match, none, several, an exact one first."""

from __future__ import annotations

import grpc
import pytest

from ota.cli.prefix import by_prefix, paged, resolve, unique_match
from ota.errors import InvalidArgument

TOKENS = ["2ae664a5de7e41c0", "2ae6ff0011223344", "9b00aa11bb22cc33"]


def test_a_unique_prefix_stands_for_its_identifier() -> None:
    assert unique_match("2ae664a5de7e", TOKENS, noun="token") == "2ae664a5de7e41c0"
    assert unique_match("9", TOKENS, noun="token") == "9b00aa11bb22cc33"
    assert unique_match("ff", TOKENS, noun="token") is None


def test_an_ambiguous_prefix_names_every_candidate_on_one_line() -> None:
    with pytest.raises(InvalidArgument) as refused:
        unique_match("2ae6", TOKENS, noun="token")
    text = str(refused.value)
    assert "2ae664a5de7e41c0" in text and "2ae6ff0011223344" in text and "\n" not in text
    many = [f"r-{i:02d}" for i in range(12)]
    with pytest.raises(InvalidArgument, match=r"12 rollouts: .* and 7 more"):
        unique_match("r-", many, noun="rollout")


def test_an_exact_identifier_wins_over_a_longer_one_it_prefixes() -> None:
    assert resolve("r-1", ["r-1", "r-10", "r-11"], noun="rollout") == "r-1"
    assert resolve("nothing", ["r-1"], noun="rollout") == "nothing"


class _NotFound(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND


def test_the_list_is_read_only_when_the_server_does_not_know_the_identifier() -> None:
    asked: list[str] = []
    listed: list[int] = []

    def get(rollout_id: str) -> str:
        asked.append(rollout_id)
        if rollout_id != "r-4a47dd90":
            raise _NotFound()
        return rollout_id

    def ids() -> list[str]:
        listed.append(1)
        return ["r-4a47dd90", "r-9c00aa11"]

    assert by_prefix(get, "r-4a47dd90", ids, noun="rollout") == "r-4a47dd90" and not listed
    assert by_prefix(get, "r-4a", ids, noun="rollout") == "r-4a47dd90"
    assert asked[-2:] == ["r-4a", "r-4a47dd90"] and listed == [1]
    with pytest.raises(_NotFound):
        by_prefix(get, "r-77", ids, noun="rollout")


def test_paged_reads_every_page() -> None:
    pages = {"": (["a", "b"], "t1"), "t1": (["c"], "")}
    assert list(paged(lambda token: pages[token])) == ["a", "b", "c"]
