"""One settings object for every leukops process: the only reader of LEUKOPS_* environment variables.

Values come from the environment (prefix ``LEUKOPS_``, nested with ``__``), then an optional ``.env``
file, then the versioned config file. Secrets are demanded by the component that uses one
(``settings.secret("serving.token")``), not when the settings load: a process that never touches a
secret (an Airflow DAG being parsed, a training job) needs nothing set for it. Secrets have defaults
only in the explicit ``dev`` profile; any other profile refuses to use a missing one, naming the
variable to set. Outside ``dev`` and ``test`` (unit tests' short fixtures) a secret must also *be* one:
at least 16 characters, no ``change-me`` placeholder, no dev default (``secret_weakness``); each
component checks every secret it holds at start-up (``Settings.check_secrets``) and at use.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from functools import lru_cache, reduce
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pipelines.core.errors import LeukopsError
from pipelines.core.taxonomy import TASKS

DEV_S3_ACCESS_KEY = "leukops-dev"
DEV_S3_SECRET_KEY = "leukops-dev-secret-not-for-production"  # noqa: S105 - dev profile only
DEV_API_TOKEN = "leukops-dev-token"  # noqa: S105 - dev profile only
S3Role = Literal["ingest", "training", "drift", "serving"]  # least-privilege S3 identities (io/layout.ROLE_WRITES)
S3_ROLES: tuple[S3Role, ...] = get_args(S3Role)
DEV_SECRETS = {  # every secret setting (a field path) and its dev-profile default
    "s3_access_key": DEV_S3_ACCESS_KEY,
    "s3_secret_key": DEV_S3_SECRET_KEY,
    "serving.token": DEV_API_TOKEN,
    "postgres_password": "leukops-dev-postgres",  # the local stack's metadata DB (Airflow + MLflow)
    "redis_password": "leukops-dev-redis",  # the Celery broker
    "airflow_admin_password": "admin",  # the simple auth manager's local admin user
    "mlflow_server_secret_key": "leukops-dev-mlflow-flask-secret",  # the MLflow server's Flask sessions/CSRF
    "mlflow_users.admin": "leukops-dev-mlflow-admin",  # MLflow's bootstrap admin: people, the UI, provisioning
    "mlflow_users.promotion": "leukops-dev-mlflow-promotion",
    "mlflow_users.training": "leukops-dev-mlflow-training",
    "mlflow_users.drift": "leukops-dev-mlflow-drift",
    "mlflow_users.serving": "leukops-dev-mlflow-serving",
    "mlflow_users.qa": "leukops-dev-mlflow-qa",
    **{f"s3_roles.{role}.access_key": f"leukops-dev-s3-{role}" for role in S3_ROLES},
    **{f"s3_roles.{role}.secret_key": f"leukops-dev-s3-{role}-secret" for role in S3_ROLES},
}
MlflowRole = Literal["promotion", "training", "drift", "serving", "qa"]  # one MLflow user per process role


SECRET_MIN_LENGTH = 16
PLACEHOLDER_MARK = "change-me"  # what .env.example's placeholders contain
RELAXED_PROFILES = frozenset({"dev", "test"})  # dev: the public defaults above; test: unit tests' fixtures
GENERATE_SECRET = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


class SettingsError(LeukopsError):
    """A required setting is missing or invalid; the message names the variable to set."""


def _known_tasks(per_task: dict, setting: str, extra: tuple[str, ...] = ()) -> dict:
    """``per_task`` unchanged when every key is a task (or one of ``extra``): a misspelt task would be ignored."""
    unknown = sorted(set(per_task) - set(TASKS) - set(extra))
    if unknown:
        raise ValueError(f"{setting} names unknown task(s) {unknown}; known: {', '.join([*extra, *sorted(TASKS)])}")
    return per_task


class TaskFloors(BaseModel):
    """One task's quality floors (None: the ``default`` entry's)."""

    macro_f1_min: float | None = None
    class_recall_min: float | None = None


def _diagnostic_floors() -> dict[str, TaskFloors]:
    return {
        "default": TaskFloors(macro_f1_min=0.70, class_recall_min=0.50),
        "all_subtypes": TaskFloors(macro_f1_min=0.90, class_recall_min=0.85),
    }


class GateThresholds(BaseModel):
    """Promotion gate thresholds and the statistics they are judged with (see pipelines.trust.gate).

    Floors are per task (``floors.<task>``, else ``floors.default``):
    ``LEUKOPS_GATE__FLOORS__ALL_SUBTYPES__MACRO_F1_MIN=0.95`` changes one task's floor;
    ``LEUKOPS_GATE__MACRO_F1_MIN`` / ``LEUKOPS_GATE__CLASS_RECALL_MIN``, when set, override the floor of every
    task (a quick experiment, a demo). Every other key is global, e.g. ``LEUKOPS_GATE__MIN_CHECK_IMAGES=30``.
    """

    floors: dict[str, TaskFloors] = Field(default_factory=_diagnostic_floors)
    macro_f1_min: float | None = None  # set: overrides floors.<task>.macro_f1_min of every task
    class_recall_min: float | None = None  # set: overrides floors.<task>.class_recall_min of every task
    non_inferiority_margin: float = 0.02  # macro-F1 the candidate may lose to @champion (paired lower bound)
    nucleus_enrichment_min: float = 1.2
    # where Grad-CAM must concentrate, per task (else "default"): the nucleus for the leukaemia tasks (blast vs
    # haematogone is a chromatin call); the whole leukocyte where classes differ in cytoplasm and granules too
    # (eosinophil, basophil) or have no nucleus (platelet), judged against cell_enrichment_min
    evidence_region: dict[str, Literal["nucleus", "cell"]] = Field(
        default_factory=lambda: {"default": "nucleus", "wbc": "cell"}
    )
    cell_enrichment_min: float = 1.1  # the cell fills ~half a cell-cropped input: ~2 at most, uniform 1.0

    @field_validator("evidence_region")
    @classmethod
    def _evidence_tasks(cls, value: dict) -> dict:
        return _known_tasks(value, "gate.evidence_region", ("default",))

    shortcut_flip_rate_max: float = 0.10  # ceiling on the one-sided upper bound of the flip rate
    lime_agreement_min: float | None = None
    holdout_macro_f1_min: float | None = None  # set: floor on every holdout source's macro-F1 lower bound
    # per site (source) of the test split, sites with >= min_check_images images (pipelines.trust.sites):
    site_macro_f1_min: float | None = None  # floor on each site's macro-F1 lower bound; unset: the task's floor
    site_non_inferiority_margin: float | None = None  # per-site paired margin; unset: non_inferiority_margin
    min_check_images: int = 30  # a check resting on fewer images is "insufficient evidence" and fails
    confidence: float = 0.95  # one-sided confidence of every bound the gate judges
    bootstrap_resamples: int = 2000  # paired bootstrap of the macro-F1 (difference), fixed seed
    bootstrap_seed: int = 0
    shortcut_images: int = 300  # test images the shortcut test intervenes on (fewer if the split is smaller)

    def evidence_region_of(self, task: str) -> str:
        """The region ``task``'s Grad-CAM enrichment is judged on: its entry, else default, else nucleus."""
        return self.evidence_region.get(task, self.evidence_region.get("default", "nucleus"))

    def task_floors(self, task: str) -> tuple[float, float]:
        """(macro-F1 floor, class-recall floor) of ``task``: the override, else its entry, else default."""
        default = self.floors.get("default", TaskFloors())
        own = self.floors.get(task, TaskFloors())
        f1 = next(v for v in (self.macro_f1_min, own.macro_f1_min, default.macro_f1_min, 0.0) if v is not None)
        recall = next(
            v for v in (self.class_recall_min, own.class_recall_min, default.class_recall_min, 0.0) if v is not None
        )
        return f1, recall


class DriftThresholds(BaseModel):
    """Drift monitoring and the retrain rule (see pipelines.monitor). Override e.g. LEUKOPS_DRIFT__MAX_ROWS=500."""

    column_alpha: float = 0.05  # family-wise false-alarm rate per column family (Bonferroni-split p-value tests)
    large_sample_rows: int = 1000  # above this many rows per side, effect-size distances replace p-value tests
    distance_threshold: float = 0.1  # normed Wasserstein / Jensen-Shannon distance that counts as drift (large n)
    dataset_drift_share: float = 0.3  # share of drifted image-fact columns that makes the dataset drifted
    embedding_quantile: float = 0.99  # domain-classifier ROC-AUC must beat this quantile of chance ROC-AUCs
    pca_components: int = 16  # embedding PCA components (fitted on the reference, stored with it)
    max_rows: int = 1000  # rows sampled per side (bounds embedding and t-SNE time)
    retrain_drift_share: float = 0.5  # retrain when this share of image-fact columns drifted ...
    retrain_embedding_auc: float = 0.75  # ... or the embedding domain classifier reaches this ROC-AUC ...
    retrain_on_prediction_drift: bool = False  # ... or (when true) the predicted-class mix drifted


class TaskRecipe(BaseModel):
    """One task's training options that differ from ``retrain``'s (None: the global value)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option would otherwise be silently ignored

    # single-cell images: the scale of the cell-centred crop (model.cell_crop), so every lab's magnification
    # maps onto one cell size; 0 (fields of many cells, the ALL sets) keeps the whole image
    cell_crop: float | None = None  # 0, or 1-10 x the nucleus (checked with the training request)
    image_size: int | None = Field(None, ge=32, le=1024)  # the bounds of the DAG's image_size param
    stain_augment: Literal["none", "hed"] | None = None
    site_balance: float | None = Field(None, ge=0, le=1)
    warm_start: bool | None = None


def _single_cell_recipes() -> dict[str, TaskRecipe]:
    # wbc (as leukops.yaml): a square twice the nucleus holds the cell (nucleus ~0.5-0.8 of its width) and a
    # rim; 160 px keeps granules and chromatin; HED jitter because the next lab's stain is unseen; a lab that
    # joins is learnt by fine-tuning the verified champion on the grown data, not from ImageNet again
    return {"wbc": TaskRecipe(cell_crop=2.0, image_size=160, stain_augment="hed", warm_start=True)}


class RetrainConfig(BaseModel):
    """What the nightly retrain trains: the task(s) and the backbone x augmentation grid."""

    model_config = ConfigDict(extra="forbid")  # a misspelt (or retired) key in leukops.yaml is refused

    schedule: str = "0 2 * * *"
    tasks: list[str] = Field(default_factory=lambda: ["all_subtypes"])
    backbones: list[str] = Field(default_factory=lambda: ["efficientnet_lite0"])
    augmentations: list[str] = Field(default_factory=lambda: ["none"])
    image_size: int = 128
    batch_size: int = 32
    max_images: int | None = None
    # the training recipe (pipelines.model.train.TrainConfig has the same fields and defaults); `leukops
    # train`, the nightly DAG and benchmarks/train.py all resolve from here (candidate.train_config)
    epochs: int = 40  # the most epochs; the time budget usually plans fewer
    time_budget_min: float | None = 10.0  # per candidate, training + validation wall time
    lr: float = 1e-3  # AdamW peak LR (head; layer-wise decay below it for pretrained encoders)
    head_epochs: int = 0  # pretrained: head-only epochs before full fine-tuning
    layer_lr_floor: float = 1.0  # pretrained: LR scale of the encoder's first layer group (1 = uniform)
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_ratio: float = 0.05  # linear warm-up over this share of the planned steps, then cosine (per update)
    min_lr_ratio: float = 0.01
    ema_decay: float = 0.995  # timm ModelEmaV3 with warm-up; the EMA weights are validated and kept (0 = off)
    class_balanced: bool = True  # class-weighted cross-entropy (sklearn "balanced")
    patience: int = 10
    seed: int = 0
    tta: list[str] = Field(default_factory=list)  # evaluation views besides the identity: hflip, vflip
    # stain robustness (pipelines.model.stain): HED jitter in training ("none" | "hed", σ in optical density)
    # and a normaliser fitted on a fixed sample of the training split ("none" | "macenko" | "reinhard")
    stain_augment: str = "none"
    stain_strength: float = 0.1
    stain_normalize: str = "none"
    stain_reference_images: int = 32
    # sources of unequal size (a new lab's 50 images beside 1,300 of the first lab): training draws each
    # image with weight n_site^-site_balance (0 = plain shuffle, 0.5 = square root, 1 = each site equally)
    site_balance: float = 0.5
    # start each candidate from the task's @champion when it is the same network (backbone, size, classes):
    # a retrain on a grown dataset fine-tunes the serving model instead of restarting from ImageNet
    warm_start: bool = False
    # a task's departures from the recipe above (a DAG run's param still applies to every task)
    per_task: dict[str, TaskRecipe] = Field(default_factory=_single_cell_recipes)

    @field_validator("per_task")
    @classmethod
    def _per_task_tasks(cls, value: dict) -> dict:
        return _known_tasks(value, "retrain.per_task")

    def recipe_of(self, task: str) -> dict[str, Any]:
        """``task``'s recipe options that differ from the global ones (`TaskRecipe`), by field name."""
        recipe = self.per_task.get(task)
        return recipe.model_dump(exclude_none=True) if recipe else {}

    explain_samples: int = 32
    explain_lime_images: int = 3
    gpu_pool_slots: int = 1


class ServingSettings(BaseModel):
    """The serving API (see serving/). Override e.g. LEUKOPS_SERVING__TASK=wbc, LEUKOPS_SERVING__TOKEN=..."""

    token: SecretStr | None = None  # bearer token of /v1/*; read it with Settings.secret("serving.token")
    task: str = "all_subtypes"  # the task whose @champion the API serves
    max_upload_mb: float = 20.0  # largest accepted upload
    max_pixels: int = 40_000_000  # decompression-bomb guard (width x height)
    reload_interval_s: float = 30.0  # how often @champion is polled for a new version
    log_raw_images: bool = False  # also store request images in S3 (off: only facts are logged)
    log_embeddings: bool = True  # add the model's penultimate embedding to the request log
    request_log_flush_rows: int = 256  # request-log rows per parquet part
    request_log_flush_s: float = 30.0  # longest a request-log row waits before being written
    max_batch: int = 8  # micro-batch size for concurrent predictions (1 = off)
    batch_wait_ms: float = 2.0  # how long a request waits for others to join its batch
    cors_origins: list[str] = Field(default_factory=list)  # CORS allow-list (empty = CORS off)
    # Ed25519 public key (PEM) that verifies promotion attestations; dev: <state_dir>/keys/ (leukops keys generate)
    attestation_public_key: Path | None = None
    # /metrics, /docs, /redoc, /openapi.json take the API token or this one (a scraper needs no /v1 access)
    metrics_token: SecretStr | None = None
    metrics_per_class: bool = False  # predictions counted per class: at low traffic they reveal single results
    max_in_flight: int = 8  # predictions at once (each holds a decoded image of up to max_pixels); more: 429
    rate_limit_per_s: float = 20.0  # sustained /v1 requests per second per token (0 = no limit); more: 429
    rate_limit_burst: int = 40  # requests a token may send at once before the rate applies


class MlflowUsers(BaseModel):
    """Passwords of the MLflow server's users (its basic-auth app); a user's name is its field's name, the
    admin's ``mlflow_admin_user``. Set e.g. LEUKOPS_MLFLOW_USERS__TRAINING; read with
    ``Settings.secret("mlflow_users.training")``. promotion is an MLflow admin, training and drift may edit
    their experiments, serving and qa only read (pipelines.io.mlflow_access)."""

    admin: SecretStr | None = None
    promotion: SecretStr | None = None
    training: SecretStr | None = None
    drift: SecretStr | None = None
    serving: SecretStr | None = None
    qa: SecretStr | None = None


class S3Credentials(BaseModel):
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None


class S3Roles(BaseModel):
    """The key pair of each least-privilege S3 identity, e.g. LEUKOPS_S3_ROLES__SERVING__ACCESS_KEY; a process
    with ``s3_role`` set uses its role's pair (``ObjectStore.from_settings``), what each role may write is
    ``pipelines.io.layout.ROLE_WRITES``. ``s3_access_key``/``s3_secret_key`` stay the stack's admin pair."""

    ingest: S3Credentials = Field(default_factory=S3Credentials)
    training: S3Credentials = Field(default_factory=S3Credentials)
    drift: S3Credentials = Field(default_factory=S3Credentials)
    serving: S3Credentials = Field(default_factory=S3Credentials)


class SchedulesConfig(BaseModel):
    drift: str = "0 6 * * *"
    ingest_poll: str = "*/30 * * * *"
    drift_window_days: int = 1


def config_file_path() -> Path:
    """The versioned pipeline config (grid, schedules, thresholds); LEUKOPS_CONFIG_FILE moves it."""
    return Path(os.environ.get("LEUKOPS_CONFIG_FILE", "leukops.yaml"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LEUKOPS_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    profile: Literal["dev", "test", "prod"] = "prod"
    state_dir: Path = Path(".leukops")

    s3_endpoint: str = "http://127.0.0.1:18333"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    data_bucket: str = "leukops-data"
    artifacts_bucket: str = "leukops-mlflow"
    s3_role: S3Role | None = None  # the S3 identity this process's stores use (None: the admin pair above)
    s3_roles: S3Roles = Field(default_factory=S3Roles)

    mlflow_tracking_uri: str = "http://127.0.0.1:15000"
    mlflow_experiment: str = "leukops"
    registered_model_prefix: str = "leukops"
    mlflow_role: MlflowRole | None = None  # the MLflow user this process logs in as (unset in dev: promotion)
    mlflow_admin_user: str = "admin"
    mlflow_users: MlflowUsers = Field(default_factory=MlflowUsers)
    mlflow_server_secret_key: SecretStr | None = None  # MLFLOW_FLASK_SERVER_SECRET_KEY of the MLflow server

    airflow_url: str = "http://127.0.0.1:8080"  # the Airflow api-server (UI, REST API, execution API)
    airflow_admin_user: str = "admin"
    airflow_admin_password: SecretStr | None = None
    postgres_password: SecretStr | None = None  # embedded stack: Postgres user `leukops`
    redis_password: SecretStr | None = None  # embedded stack: Celery broker

    sources_dir: Path = Path("expectations/sources")
    max_file_bytes: int = 64 * 1024 * 1024  # ingest refuses a larger source file from its stat, unread
    suite_dir: Path = Path("expectations")
    config_file: Path = Field(default_factory=config_file_path)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    schedules: SchedulesConfig = Field(default_factory=SchedulesConfig)

    serving: ServingSettings = Field(default_factory=ServingSettings)
    gate: GateThresholds = Field(default_factory=GateThresholds)
    require_approval: bool = False  # promotion: a passing candidate waits as @challenger for `leukops approve`
    # Ed25519 private key (PEM) the promotion job signs attestations with; never given to serving
    promotion_signing_key: Path | None = None  # dev: <state_dir>/keys/ (pipelines.trust.attestation)
    actor: str | None = None  # who registry audit tags name (default: the OS user), e.g. airflow:<dag_run_id>
    drift: DriftThresholds = Field(default_factory=DriftThresholds)  # pipelines.monitor.drift (issue 7)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then environment, then .env, then the versioned config file.
        yaml_source = YamlConfigSettingsSource(settings_cls, yaml_file=config_file_path())
        return init_settings, env_settings, dotenv_settings, yaml_source, file_secret_settings

    @property
    def s3_secure(self) -> bool:
        return urlparse(self.s3_endpoint).scheme == "https"

    @property
    def s3_host(self) -> str:
        """host:port as the minio SDK wants it."""
        return urlparse(self.s3_endpoint).netloc

    def registered_model_name(self, task: str) -> str:
        return f"{self.registered_model_prefix}-{task}"

    def secret(self, path: str) -> str:
        """The secret at ``path`` (a key of ``DEV_SECRETS``), demanded by the component about to use it.

        Only the dev profile falls back to a built-in value; elsewhere a missing secret is an error that
        names its environment variable, and so is a weak one outside dev/test.
        """
        value: SecretStr | None = reduce(getattr, path.split("."), self)
        if value is not None:
            self._refuse_weak(path, value.get_secret_value())
            return value.get_secret_value()
        if self.profile == "dev" and path in DEV_SECRETS:
            return DEV_SECRETS[path]
        raise SettingsError(
            f"{env_name(path)} is not set (profile {self.profile!r}); set it (e.g. {GENERATE_SECRET}), "
            "or use LEUKOPS_PROFILE=dev for the embedded local stack"
        )

    def check_secrets(self) -> None:
        """A component's start-up check: every secret that is set must be a real one (outside dev/test).

        Walks the whole model, so a secret setting added anywhere is covered; unset secrets are left to
        ``secret()`` (demanded by the component that uses one).
        """
        if self.profile in RELAXED_PROFILES:
            return
        weak = [(path, reason) for path, value in secret_fields(self) if (reason := secret_weakness(value))]
        if weak:
            listing = "; ".join(f"{env_name(path)} {reason}" for path, reason in weak)
            raise SettingsError(f"{listing} (profile {self.profile!r}); generate each with {GENERATE_SECRET}")

    def _refuse_weak(self, path: str, value: str) -> None:
        reason = None if self.profile in RELAXED_PROFILES else secret_weakness(value)
        if reason is not None:
            raise SettingsError(
                f"{env_name(path)} {reason} (profile {self.profile!r}); generate one with {GENERATE_SECRET}"
            )

    def check_bind(self, host: str, what: str, acknowledged: bool = False) -> None:
        """Refuse to expose ``what`` beyond loopback in the dev profile, whose built-in secrets are public."""
        if self.profile != "dev" or acknowledged or is_loopback(host):
            return
        raise SettingsError(
            f"refusing to bind {what} to {host!r}: LEUKOPS_PROFILE=dev uses public built-in secrets (the API "
            "token, the S3 keys). Bind 127.0.0.1, or run a non-dev profile with real secrets, or pass "
            "--i-know-this-is-dev"
        )


def secret_weakness(secret: SecretStr | str) -> str | None:
    """Why ``secret`` cannot be a production secret (a phrase to follow its variable's name), or None."""
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    if PLACEHOLDER_MARK in value.lower():
        return f"still holds the {PLACEHOLDER_MARK!r} placeholder"
    if value in DEV_SECRETS.values():
        return "is a public dev-profile default"
    if len(value) < SECRET_MIN_LENGTH:
        return f"is shorter than {SECRET_MIN_LENGTH} characters"
    return None


def secret_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, SecretStr]]:
    """(settings path, value) of every secret that is set, nested sections included."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            yield prefix + name, value
        elif isinstance(value, BaseModel):
            yield from secret_fields(value, f"{prefix}{name}.")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); names other than localhost are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def env_name(path: str) -> str:
    """The environment variable of a settings path: ``serving.token`` -> ``LEUKOPS_SERVING__TOKEN``."""
    return "LEUKOPS_" + path.replace(".", "__").upper()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, created once (tests call ``get_settings.cache_clear()``)."""
    return Settings()
