"""String values in MLflow search filters survive MLflow's own parser, quotes included."""

import pytest
from mlflow.utils.search_utils import SearchModelVersionUtils, SearchUtils

from pipelines.io.search_filter import SearchFilterError, quoted


@pytest.mark.parametrize("value", ["leukops-binary_all", "lab's model", 'a "quoted" name', "", "50% = done"])
def test_a_quoted_value_parses_back_to_itself(value: str) -> None:
    (model,) = SearchModelVersionUtils.parse_search_filter(f"name = {quoted(value)}")
    assert model["value"] == value
    (tag, status) = SearchUtils.parse_search_filter(f"tags.`key` = {quoted(value)} and attributes.status = 'FINISHED'")
    assert tag["value"] == value and status["value"] == "FINISHED"


def test_a_value_with_both_quote_characters_is_refused() -> None:
    with pytest.raises(SearchFilterError, match="both quote characters"):
        quoted("""it's "both" """)
