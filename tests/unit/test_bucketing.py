"""`ota-bucket-v1`: golden vectors and the properties PROTOCOL §6 asks for.

The vectors (`bucketing_vectors.json`, next to this file) are the reference
values any firmware's implementation must reproduce (docs/PROTOCOL.md §6).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ota.domain import bucketing
from ota.domain.bucketing import (
    HOLDOUT_MAX_PPM,
    PPM_MAX,
    bucket_hash,
    check_ppm,
    is_control,
    is_exposed,
    threshold,
)
from ota.errors import InvalidArgument

VECTORS_PATH = Path(__file__).with_name("bucketing_vectors.json")
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
SPACE = 1 << 64

# ---------------------------------------------------------------------------
# Golden vectors
# ---------------------------------------------------------------------------


def test_vector_file_describes_this_algorithm() -> None:
    assert VECTORS["algorithm"] == "ota-bucket-v1"
    assert set(VECTORS) == {"algorithm", "definition", "thresholds", "framing_pair", "vectors"}
    assert len(VECTORS["vectors"]) >= 32
    # Every vector states membership at exactly the ppm values whose thresholds are given,
    # so each in_at_ppm figure is checked against a pinned threshold too.
    for vector in VECTORS["vectors"]:
        assert set(vector["in_at_ppm"]) == set(VECTORS["thresholds"])


@pytest.mark.parametrize(("ppm", "expected"), sorted(VECTORS["thresholds"].items()))
def test_threshold_vectors(ppm: str, expected: str) -> None:
    assert threshold(int(ppm)) == int(expected)


def test_framing_pair_vectors() -> None:
    pair = VECTORS["framing_pair"]
    assert set(pair) == {"salt_a_uid_bc", "salt_ab_uid_c"}
    assert bucket_hash(b"a", "bc") == int(pair["salt_a_uid_bc"])
    assert bucket_hash(b"ab", "c") == int(pair["salt_ab_uid_c"])
    # Without length prefixes both would hash "abc": the framing must keep them apart.
    assert bucket_hash(b"a", "bc") != bucket_hash(b"ab", "c")


def _vector_id(vector: dict[str, Any]) -> str:
    uid = vector["unit_id"]
    short = uid if len(uid) <= 24 else f"{uid[:12]}...({len(uid)})"
    return f"{vector['salt_hex'][:8] or 'empty'}-{short}"


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=_vector_id)
def test_hash_vectors(vector: dict[str, Any]) -> None:
    salt = bytes.fromhex(vector["salt_hex"])
    assert bucket_hash(salt, vector["unit_id"]) == int(vector["hash_u64"])


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=_vector_id)
def test_membership_vectors(vector: dict[str, Any]) -> None:
    salt = bytes.fromhex(vector["salt_hex"])
    uid = vector["unit_id"]
    for ppm, expected in vector["in_at_ppm"].items():
        assert is_exposed(salt, uid, int(ppm)) is expected, f"ppm={ppm}"
        # The file is self-consistent: membership is hash < pinned threshold.
        assert (int(vector["hash_u64"]) < int(VECTORS["thresholds"][ppm])) is expected


def test_vectors_cover_the_awkward_inputs() -> None:
    salts = {v["salt_hex"] for v in VECTORS["vectors"]}
    uids = {v["unit_id"] for v in VECTORS["vectors"]}
    assert "" in salts  # empty salt
    assert any(len(uid) > 100 for uid in uids)  # long id
    assert any(not uid.isascii() for uid in uids)  # multi-byte UTF-8


# ---------------------------------------------------------------------------
# Independent restatement of the definition
# ---------------------------------------------------------------------------


def _reference_hash(salt: bytes, device_id: str) -> int:
    uid = device_id.encode("utf-8")
    msg = b"ota-bucket-v1\x00" + struct.pack(">H", len(salt)) + salt
    msg += struct.pack(">H", len(uid)) + uid
    return int.from_bytes(hashlib.sha256(msg).digest()[:8], "big")


salts = st.binary(max_size=32)
device_ids = st.text(max_size=40)
ppms = st.integers(min_value=0, max_value=PPM_MAX)


@given(salts, device_ids)
def test_hash_matches_the_written_definition(salt: bytes, device_id: str) -> None:
    h = bucket_hash(salt, device_id)
    assert h == _reference_hash(salt, device_id)
    assert 0 <= h < SPACE


@given(salts, device_ids, ppms)
def test_exposure_is_exact_integer_comparison(salt: bytes, device_id: str, ppm: int) -> None:
    # h < floor(ppm * 2^64 / 10^6)  <=>  (h + 1) * 10^6 <= ppm * 2^64, with no rounding anywhere.
    h = bucket_hash(salt, device_id)
    assert is_exposed(salt, device_id, ppm) is ((h + 1) * PPM_MAX <= ppm << 64)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@given(salts, device_ids, ppms, ppms)
def test_monotonic_in_ppm(salt: bytes, device_id: str, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert threshold(low) <= threshold(high)
    if is_exposed(salt, device_id, low):
        assert is_exposed(salt, device_id, high)
    if is_control(salt, device_id, min(low, HOLDOUT_MAX_PPM)):
        assert is_control(salt, device_id, min(high, HOLDOUT_MAX_PPM))


@given(salts, device_ids)
def test_exact_at_zero_and_full(salt: bytes, device_id: str) -> None:
    assert not is_exposed(salt, device_id, 0)
    assert is_exposed(salt, device_id, PPM_MAX)
    assert not is_control(salt, device_id, 0)


@pytest.mark.parametrize("ppm", [1, 10_000, 250_000, HOLDOUT_MAX_PPM])
def test_comparisons_at_the_exact_boundary(monkeypatch: pytest.MonkeyPatch, ppm: int) -> None:
    # No searchable input hashes exactly onto a threshold, so pin the hash to pin the
    # comparisons: exposed is h < T, control is h >= 2^64 - T.
    t = threshold(ppm)

    def exposed_with(h: int) -> bool:
        monkeypatch.setattr(bucketing, "bucket_hash", lambda salt, device_id: h)
        return is_exposed(b"salt", "dev", ppm)

    def control_with(h: int) -> bool:
        monkeypatch.setattr(bucketing, "bucket_hash", lambda salt, device_id: h)
        return is_control(b"salt", "dev", ppm)

    assert exposed_with(t - 1)
    assert not exposed_with(t)
    assert not control_with(SPACE - t - 1)
    assert control_with(SPACE - t)
    assert control_with(SPACE - 1)
    assert exposed_with(0)
    assert not control_with(0)


def test_thresholds_at_the_edges() -> None:
    assert threshold(0) == 0
    assert threshold(PPM_MAX) == SPACE  # above every u64 hash: everybody is exposed
    assert threshold(PPM_MAX - 1) < SPACE - 1
    assert threshold(HOLDOUT_MAX_PPM) == SPACE // 2


# Uniformity on structured ids.
#
# Each device is exposed independently with probability p = T(ppm) / 2^64, so
# the exposed count over n ids is Binomial(n, p): std dev of the fraction is
# sqrt(p (1 - p) / n). At p = 0.1, n = 20 000 that is 0.00212; allowing 5 std
# devs (0.0106) gives a false-failure chance of about 6e-7 per example, while
# any real bias in the hash on sequential ids (e.g. a run of adjacent serials
# landing together) would be far outside it.
N_IDS = 20_000
SIGMAS = 5.0
TEN_PERCENT = 100_000

VIN_ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"  # VINs never use I, O or Q


def _tolerance(p: float, n: int) -> float:
    return SIGMAS * math.sqrt(p * (1 - p) / n)


def _sequential_serials(prefix: str, start: int) -> list[str]:
    return [f"{prefix}{start + i:06d}" for i in range(N_IDS)]


def _vins(prefix: str, start: int) -> list[str]:
    # 11 fixed characters (WMI, VDS, check digit, model year, plant) + 6-digit serial.
    return [f"{prefix}{start + i:06d}" for i in range(N_IDS)]


structured_fleets = st.one_of(
    st.builds(
        _sequential_serials,
        st.sampled_from(["sim-", "SN", "dev-eu-", ""]),
        st.integers(0, 10**5),
    ),
    st.builds(
        _vins,
        st.text(alphabet=VIN_ALPHABET, min_size=11, max_size=11),
        st.integers(0, 10**5),
    ),
)


@settings(max_examples=12, deadline=None)
@given(salt=st.binary(min_size=16, max_size=16), fleet=structured_fleets)
def test_uniform_on_structured_ids(salt: bytes, fleet: list[str]) -> None:
    assert len(fleet) == len(set(fleet)) >= 20_000
    p = threshold(TEN_PERCENT) / SPACE
    exposed = sum(is_exposed(salt, uid, TEN_PERCENT) for uid in fleet) / len(fleet)
    control = sum(is_control(salt, uid, TEN_PERCENT) for uid in fleet) / len(fleet)
    tol = _tolerance(p, len(fleet))
    assert abs(exposed - p) <= tol, (exposed, p, tol)
    assert abs(control - p) <= tol, (control, p, tol)


# Independence between salts: with p exposed under each of two salts, the
# overlap is Binomial(n, p^2) if the salts are independent, std dev
# sqrt(p^2 (1 - p^2) / n) = 0.0007 at p = 0.1, 0.0031 at p = 0.5 (n = 20 000).
@settings(max_examples=8, deadline=None)
@given(
    salt_a=st.binary(min_size=16, max_size=16),
    salt_b=st.binary(min_size=16, max_size=16),
    ppm=st.sampled_from([TEN_PERCENT, 500_000]),
    prefix=st.sampled_from(["sim-", "WVWZZZ1JZXW"]),
)
def test_independent_between_salts(salt_a: bytes, salt_b: bytes, ppm: int, prefix: str) -> None:
    assume(salt_a != salt_b)
    fleet = _sequential_serials(prefix, 0)
    p = threshold(ppm) / SPACE
    both = sum(is_exposed(salt_a, uid, ppm) and is_exposed(salt_b, uid, ppm) for uid in fleet)
    overlap = both / len(fleet)
    tol = _tolerance(p * p, len(fleet))
    assert abs(overlap - p * p) <= tol, (overlap, p * p, tol)


def test_same_salt_gives_same_cohort() -> None:
    # A salt copied from an earlier rollout keeps its canary cohort.
    salt = bytes(range(16))
    fleet = _sequential_serials("sim-", 0)[:2000]
    first = [uid for uid in fleet if is_exposed(salt, uid, 50_000)]
    again = [uid for uid in fleet if is_exposed(bytes(salt), uid, 50_000)]
    assert first == again and first


@given(salts, device_ids, st.integers(0, HOLDOUT_MAX_PPM))
def test_control_and_exposed_disjoint(salt: bytes, device_id: str, ppm: int) -> None:
    assert not (is_exposed(salt, device_id, ppm) and is_control(salt, device_id, ppm))


@given(salts, device_ids)
def test_half_and_half_partition_the_fleet(salt: bytes, device_id: str) -> None:
    # At the maximum holdout the two slices meet exactly at 2^63.
    assert is_exposed(salt, device_id, HOLDOUT_MAX_PPM) != is_control(
        salt, device_id, HOLDOUT_MAX_PPM
    )


@given(st.integers(0, HOLDOUT_MAX_PPM), ppms)
def test_control_slice_never_reaches_exposure_while_they_fit(holdout: int, exposure: int) -> None:
    # Exposure (bottom slice) and holdout (top slice) cannot overlap while
    # exposure + holdout <= 100 %: T(e) + T(h) <= 2^64.
    assume(exposure + holdout <= PPM_MAX)
    assert threshold(exposure) <= SPACE - threshold(holdout)


@given(salts, st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=20))
def test_framing_unambiguous(salt: bytes, uid: str) -> None:
    # Moving a byte across the salt/uid boundary changes the hash.
    moved_salt, moved_uid = salt + uid[0].encode(), uid[1:]
    assert bucket_hash(salt, uid) != bucket_hash(moved_salt, moved_uid)


# ---------------------------------------------------------------------------
# Invalid input
# ---------------------------------------------------------------------------

invalid_ppms = st.one_of(st.integers(max_value=-1), st.integers(min_value=PPM_MAX + 1))


@given(invalid_ppms)
def test_invalid_ppm_raises(ppm: int) -> None:
    with pytest.raises(InvalidArgument) as exc:
        is_exposed(b"salt", "dev", ppm)
    assert exc.value.field == "ppm"
    assert str(ppm) in exc.value.message
    with pytest.raises(InvalidArgument):
        threshold(ppm)
    with pytest.raises(InvalidArgument):
        is_control(b"salt", "dev", ppm)


@pytest.mark.parametrize("ppm", [-1, PPM_MAX + 1, -(10**30), 10**30])
def test_check_ppm_names_field(ppm: int) -> None:
    with pytest.raises(InvalidArgument) as exc:
        check_ppm(ppm, field="stages[2].ppm")
    assert exc.value.field == "stages[2].ppm"
    assert str(exc.value).startswith("stages[2].ppm: ")


@pytest.mark.parametrize("ppm", [0, 1, 500_000, PPM_MAX])
def test_check_ppm_returns_valid(ppm: int) -> None:
    assert check_ppm(ppm) == ppm


@pytest.mark.parametrize("holdout", [HOLDOUT_MAX_PPM + 1, PPM_MAX])
def test_holdout_over_half_raises(holdout: int) -> None:
    with pytest.raises(InvalidArgument) as exc:
        is_control(b"salt", "dev", holdout)
    assert exc.value.field == "holdout_ppm"


def test_oversized_salt_or_id_raises() -> None:
    bucket_hash(b"s" * 0xFFFF, "x" * 0xFFFF)  # the largest framable lengths are fine
    with pytest.raises(InvalidArgument):
        bucket_hash(b"s" * 0x10000, "dev")
    with pytest.raises(InvalidArgument):
        bucket_hash(b"salt", "x" * 0x10000)
    with pytest.raises(InvalidArgument):
        bucket_hash(b"salt", "ß" * 0x8000)  # 65536 bytes once UTF-8 encoded
