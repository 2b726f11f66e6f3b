"""≥ 20,000 mutated images through the shared decode/facts path: none may raise anything but its reason.

Mutants (pipelines.devstack.mutants) are ≤ 64 px seeds in every raster format, with seeded byte flips,
truncations and header edits, so a failure reproduces from its name. Each file must either decode to
facts or come back as a decode error with a known reason: an exception escaping here would abort the
scan of a whole source (and every retry of it). ~10 s on one core; benchmarks/fuzz_decode.py prints
the count per reason and files/s.
"""

from __future__ import annotations

from collections import Counter

import pytest

from pipelines.data.imagefacts import DECODE_REASONS
from pipelines.data.scan import examine
from pipelines.devstack.mutants import mutants, seed_files

MUTANTS = 24_000
FUZZ_SEED = 7  # this seed's corpus holds a TIFF whose strip offset became text (a TypeError in Pillow)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on each corrupt EXIF/TIFF tag it skips
def test_no_exception_escapes_decode_or_facts_for_mutated_images() -> None:
    escaped: dict[str, str] = {}
    reasons: Counter[str] = Counter()
    for name, data in mutants(MUTANTS, seed=FUZZ_SEED):
        try:
            examined = examine(data)
        except Exception as err:  # noqa: BLE001 - what the test looks for
            escaped[name] = f"{type(err).__name__}: {err}"
            continue
        reasons[examined.get("decode_error", "decoded")] += 1
        if "decode_error" in examined:
            assert examined["decode_detail"], f"{name}: {examined['decode_error']} without a detail"
    assert not escaped, f"{len(escaped)} exception(s) escaped, e.g. {dict(list(escaped.items())[:5])}"
    assert set(reasons) - {"decoded"} <= set(DECODE_REASONS), reasons
    assert reasons["decoded"] > 0.1 * MUTANTS and sum(reasons.values()) == MUTANTS  # the corpus is not all noise


def test_every_seed_decodes() -> None:
    """The mutations start from valid files of each format (else the fuzz would only test the header check)."""
    failed = {name: examine(data).get("decode_error") for name, data in seed_files().items()}
    assert {name: reason for name, reason in failed.items() if reason} == {}
    assert {name.rsplit(".", 1)[1] for name in failed} == {"png", "jpg", "tif", "gif", "bmp", "webp"}


def test_the_corpus_is_the_same_for_the_same_seed() -> None:
    assert list(mutants(50, seed=3)) == list(mutants(50, seed=3))
    assert list(mutants(50, seed=3)) != list(mutants(50, seed=4))
