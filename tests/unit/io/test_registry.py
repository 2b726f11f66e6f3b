"""The registry adapter's lookups against a stand-in MLflow client: the champion, aliases, escaped filters."""

from types import SimpleNamespace

from pipelines.core.settings import Settings
from pipelines.io.registry import Registry


class FakeClient:
    """The few MlflowClient calls the lookups make, over one registered model with two versions."""

    def __init__(self, aliases: dict[str, str]):
        self.aliases = aliases
        self.filters: list[str] = []

    def get_registered_model(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(aliases=self.aliases)

    def get_model_version(self, name: str, version: str) -> SimpleNamespace:
        return SimpleNamespace(
            name=name,
            version=version,
            run_id=None if version == "2" else f"run{version}",
            source=f"s3://models/{version}",
            status="READY",
            creation_timestamp=1,
            aliases=[a for a, v in self.aliases.items() if v == version],
            tags={},
            description="",
        )

    def search_model_versions(self, filter_string: str, max_results: int) -> list[SimpleNamespace]:
        self.filters.append(filter_string)
        return [self.get_model_version("m", "1")]


def registry(aliases: dict[str, str], prefix: str = "leukops") -> Registry:
    return Registry(FakeClient(aliases), Settings(registered_model_prefix=prefix))


def test_champion_is_the_version_behind_the_alias_with_its_model_uri() -> None:
    champion = registry({"champion": "1", "previous": "2"}).champion("binary_all")
    assert (champion.name, champion.version, champion.run_id) == ("leukops-binary_all", "1", "run1")
    assert champion.model_uri == "runs:/run1/model"


def test_no_champion_before_the_first_promotion() -> None:
    assert registry({}).champion("binary_all") is None


def test_a_version_without_a_run_is_loaded_from_the_registry() -> None:
    previous = registry({"champion": "1", "previous": "2"}).at_alias("binary_all", "previous")
    assert previous.model_uri == "models:/leukops-binary_all/2"


def test_a_quote_in_the_model_name_is_escaped_in_the_search_filter() -> None:
    reg = registry({}, prefix="lab's")
    reg.versions("binary_all")
    assert reg.client.filters == ["""name = "lab's-binary_all\""""]
