"""Mutated images through the shared decode/facts path: the count per outcome and files/s.

The corpus is pipelines.devstack.mutants (≤ 64 px seeds of every raster format, seeded byte flips,
truncations and header edits), as in tests/unit/data/test_decode_fuzz.py. An exception escaping
``examine`` is counted under ``ESCAPED <type>`` and printed with the mutant's name (it would abort a
source's scan); the process exits 1 if there is one.

    .venv/bin/python benchmarks/fuzz_decode.py [--count 20000] [--seed 7]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter

from pipelines.data.scan import examine
from pipelines.devstack.mutants import mutants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # Pillow warns on every corrupt tag it skips
    corpus = list(mutants(args.count, seed=args.seed))
    outcomes: Counter[str] = Counter()
    escaped: list[str] = []
    start = time.perf_counter()
    for name, data in corpus:
        try:
            outcomes[examine(data).get("decode_error", "decoded")] += 1
        except Exception as err:  # noqa: BLE001 - counted and named: what the benchmark looks for
            outcomes[f"ESCAPED {type(err).__name__}"] += 1
            escaped.append(f"{name}: {type(err).__name__}: {err}")
    seconds = time.perf_counter() - start
    print(f"{len(corpus)} mutants (seed {args.seed}) in {seconds:.1f} s: {len(corpus) / seconds:.0f} files/s")
    for outcome, count in outcomes.most_common():
        print(f"  {outcome:<24} {count:>7}  {count / len(corpus):6.1%}")
    for line in escaped[:20]:
        print(f"  escaped: {line}")
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
