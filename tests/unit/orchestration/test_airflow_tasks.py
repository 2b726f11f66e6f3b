"""The gate's view of a grid with failed cells: survivors are gated, no survivor at all is an error."""

from __future__ import annotations

import pytest

from pipelines.orchestration.airflow_tasks import FlowError, _browser_url, retrain_decision, survivors

PLANNED = [{"candidate_key": f"run/all_subtypes/{b}/none", "task": "all_subtypes"} for b in ("a", "b", "c")]


def test_the_cells_that_finished_are_gated_without_the_failed_one(caplog):
    finished = [PLANNED[0] | {"run_id": "r0"}, PLANNED[2] | {"run_id": "r2"}]
    assert survivors(PLANNED, finished) == finished
    assert "1 of 3 candidate(s) failed" in caplog.text and "run/all_subtypes/b/none" in caplog.text


def test_no_survivor_fails_and_names_every_cell():
    with pytest.raises(FlowError, match=r"every candidate failed \(run/all_subtypes/a/none, .*c/none\)"):
        survivors(PLANNED, [])


class _Store:
    bucket = "leukops-data"

    def presigned_url(self, key: str) -> str:
        return f"http://127.0.0.1:18333/{self.bucket}/{key}?X-Amz-Signature=x"


def test_drift_alerts_carry_clickable_http_links_not_s3_uris():
    url = _browser_url(_Store(), "s3://leukops-data/reports/drift/r1/report.html")
    assert url.startswith("http://") and url.endswith("report.html?X-Amz-Signature=x")
    assert _browser_url(_Store(), "s3://other-bucket/x.html") == "s3://other-bucket/x.html"  # not ours to sign
    verdict = {
        "task": "all_subtypes",
        "retrain_recommended": True,
        "new_labelled_images": 0,
        "reports": [{"retrain_recommended": True, "report_html": "s3://leukops-data/r.html", "report_url": url}],
    }
    decision = retrain_decision([verdict])
    assert decision["action"] == "alert" and url in decision["message"] and "s3://" not in decision["message"]
