"""The new-lab loop's report: the per-site table and checks read from a gate outcome (an XCom)."""

from __future__ import annotations

from pipelines.devstack.new_lab import render_sites, site_checks, site_rows

SITE = {"n": 40, "gated": True, "macro_f1": 0.9, "f1_interval": (0.8, 0.97), "classes_absent": ("platelet",)}
OUTCOME = {
    "selected_run_id": "r2",
    "chosen": {
        "run_id": "r2",
        "sites": [
            {"source": "cellavision", **SITE, "champion_macro_f1": 0.31},
            {"source": "pbc", **SITE, "n": 155, "champion_macro_f1": None},
        ],
        "checks": [
            {"name": "macro_f1", "passed": True, "detail": ""},
            {"name": "site_macro_f1[cellavision]", "passed": True, "detail": "..."},
        ],
    },
}


def test_the_table_has_a_row_per_site_with_the_old_champion_on_the_same_images():
    rows = {r["site"]: r for r in site_rows(OUTCOME)}
    assert rows["cellavision"]["champion_macro_f1"] == 0.31 and rows["pbc"]["n"] == 155
    table = render_sites(OUTCOME).splitlines()
    assert len(table) == 4 and "| cellavision | 40 | yes | 0.900 (0.800-0.970) | 0.310 |" in table
    assert table[-1].endswith("| - |")  # no champion figure: shown as such, not as 0


def test_only_the_per_site_checks_are_listed_and_an_outcome_without_a_candidate_has_none():
    assert [c["name"] for c in site_checks(OUTCOME)] == ["site_macro_f1[cellavision]"]
    assert site_rows({"chosen": None}) == [] and site_checks({}) == []
