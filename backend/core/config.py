"""All settings in one place, read from the environment and `.env` (see `.env.example`)."""

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backend.core.embedding_models import DEFAULT_MODEL, MODEL_NAMES
from backend.core.errors import ConfigurationError
from backend.core.index_options import AUTO_FASTSCAN_FROM, IndexKind, RerankCodec, parse_codec, parse_kind
from backend.core.search_params import (
    LIMIT_MAX,
    LIMIT_MIN,
    NPROBE_DEFAULT,
    NPROBE_MAX,
    NPROBE_MIN,
    TOP_CATEGORIES_MAX,
    TOP_CATEGORIES_MIN,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DB_TIMEOUT_DEFAULT_S = 5.0
SHARD_EPOCH_CHECK_S = 1.0  # how often a cluster router looks for a newer active epoch


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=PROJECT_ROOT / ".env", env_file_encoding="utf-8", extra="ignore", protected_namespaces=()
    )

    # Database: DATABASE_URL wins; else DB_HOST & co; else an embedded PostgreSQL under DATA_DIR.
    database_url: str | None = None
    db_host: str | None = None
    db_port: int = Field(5432, ge=1, le=65535)
    db_name: str = "imsrc"
    db_user: str = "postgres"
    db_password: str = ""
    # Every database call (connecting, each statement, waiting for a pooled connection) gives up after this
    # long: a stopped or frozen database makes requests answer 503 instead of hanging.
    db_timeout_seconds: float = Field(DB_TIMEOUT_DEFAULT_S, gt=0, le=3600)

    data_dir: Path = PROJECT_ROOT / "data"

    # Embedding model
    model_name: str = DEFAULT_MODEL  # one of backend/core/embedding_models.py's MODELS
    model_weights: str | None = None  # local weights file (torchvision models); "random" only for tests
    device: Literal["auto", "cpu", "cuda"] = "auto"
    embed_batch_size: int = Field(32, ge=1, le=1024)
    image_size: int | None = Field(None, ge=32, le=1024)  # model input side; None = the model's own
    # auto: ONNX Runtime on CPU when installed (about 3x faster here), else PyTorch
    embed_runtime: Literal["auto", "torch", "onnx"] = "auto"
    # Where the ONNX graphs exported from the weights are kept (default DATA_DIR/cache/onnx); the container
    # image exports them at build time into a folder of its own, so it starts without network or export.
    onnx_cache_dir: Path | None = None
    # int8: the ONNX graph statically quantized (about 2x faster on CPUs with VNNI/AMX, at the accuracy cost
    # README's "INT8 embedding" measures); its vectors have their own model id (re-embed to switch).
    embed_precision: Literal["fp32", "int8"] = "fp32"
    # The real images int8 is calibrated on: `<category>/<image>` folders (about 100 are used); unset = CIFAR-10.
    embed_calibration_dir: Path | None = None

    # Index and search (backend/index/; backend/index/layout.py). flat: each top category scanned whole (exact inside them);
    # ivf: categories split by k-means into sub-lists of about FAISS_LIST_SIZE vectors, of which a search
    # scans the FAISS_NPROBE nearest among the top categories' (per request: nprobe); fastscan: the same
    # sub-lists as 4-bit PQ codes (FASTSCAN_M of them, 0 = dimension / 4), the best RERANK_CANDIDATES
    # re-scored from a float16 file under DATA_DIR/index; auto: flat below FAISS_AUTO_THRESHOLD vectors,
    # fastscan from it (decided at each full build).
    faiss_index_type: IndexKind = "auto"
    fastscan_m: int = Field(0, ge=0, le=4096)
    faiss_auto_threshold: int = Field(AUTO_FASTSCAN_FROM, ge=0)
    faiss_list_size: int = Field(256, ge=8, le=1_000_000)
    faiss_nprobe: int = Field(NPROBE_DEFAULT, ge=NPROBE_MIN, le=NPROBE_MAX)
    # How the index holds vectors in memory: float32 (exact), float16 (half the memory), sq8 (a quarter),
    # pq<M> (M bytes per vector; M must divide the model's dimension). PostgreSQL keeps float32 anyway.
    vector_codec: str = "float32"
    # With a compressed codec (pq<M> above all), keep a second copy of the vectors (float32 or float16) and
    # re-score the best RERANK_CANDIDATES exactly: PQ's speed at close to float32's recall, for the memory.
    rerank: RerankCodec = "none"
    rerank_candidates: int = Field(100, ge=1, le=1000)  # fastscan needs 100 for recall@10 0.97 on Fashion-MNIST
    use_prototype_filtering: bool = True
    # Stage 1 (backend/search/stage1.py): how categories are ranked. prototype: averaged given-label vectors;
    # centroids: each category's k-means sub-centroids; classifier: a linear softmax classifier on the given
    # labels; auto: whichever ranked the held-out labels best at training (prototype until one is trained).
    stage1: Literal["prototype", "centroids", "classifier", "auto"] = "auto"
    default_top_categories: int = Field(3, ge=TOP_CATEGORIES_MIN, le=TOP_CATEGORIES_MAX)
    default_search_limit: int = Field(10, ge=LIMIT_MIN, le=LIMIT_MAX)
    # The server checks this often whether other processes (a CLI populate, a worker, another server)
    # changed the catalogue, and applies their changes to its index from the change log (a cheap look-up
    # when nothing changed); 0 turns the check off.
    index_refresh_seconds: float = Field(2.0, ge=0)
    # Deletions stay in the change log this long; an index cache older than that is rebuilt in full.
    change_log_retention_days: float = Field(7.0, gt=0)

    # Cluster (backend/cluster/, docs/cluster.md): unset = stage 2 in this process (the default); `auto` or
    # host:port = stage 2 on that Ray cluster's shard actors (needs requirements-cluster.txt). SHARD_GROUPS:
    # category groups (0 = 2 per node with a shard slot); SHARD_REPLICAS: actors per group, on different nodes.
    ray_address: str | None = None
    shard_groups: int = Field(0, ge=0, le=1024)
    shard_replicas: int = Field(2, ge=1, le=16)
    # A group that has not answered within this long is left out of the result, which is marked partial.
    shard_deadline_seconds: float = Field(2.0, gt=0, le=60)
    # After a rebalance, the old epoch's actors are killed once the new epoch has been active this long and
    # every live router reports the new one; at least one epoch check plus two deadlines (a search under way
    # on the old epoch, and the router's catch-up of the new one), checked below.
    shard_grace_seconds: float = Field(30.0, ge=0, le=86400)

    # API
    api_host: str = "0.0.0.0"
    api_port: int = Field(8000, ge=1, le=65535)
    max_upload_size: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)  # larger images are refused as decompression bombs
    # A request that has not answered after this long gets a 503 (its body upload included).
    request_timeout_seconds: float = Field(60.0, gt=0, le=3600)

    # Access control (backend/services/keys.py): writes = searching and reading are public, every change needs a key;
    # all = every endpoint but /health, /ready (and /metrics, see below) needs one; off = no keys, only
    # allowed when the server listens on a loopback address.
    auth_mode: Literal["writes", "all", "off"] = "writes"
    # Other sites allowed to call the API from a browser (CORS), comma-separated origins such as
    # https://app.example.com; state-changing requests from any other site are refused whatever AUTH_MODE.
    cors_origins: Annotated[list[str], NoDecode] = []
    # Host names this server answers to besides loopback names, its own addresses and its host name
    # (comma-separated; `*.example.com` patterns; `*` turns the check off): a Host header naming anything
    # else is refused, so a DNS-rebinding page cannot pass as this server. List a reverse proxy's public name.
    allowed_hosts: Annotated[list[str], NoDecode] = []
    metrics_require_key: bool = False  # /metrics: public, or only with a key holding the `metrics` scope
    log_format: Literal["text", "json"] = "text"

    # Catalogue jobs (backend/jobs/): images per chunk (one task, one transaction); `serve` runs a worker
    # in-process unless SERVE_WORKER=false (then run `worker` processes, here or on other machines).
    job_chunk_size: int = Field(256, ge=1, le=10_000)
    serve_worker: bool = True
    worker_concurrency: int = Field(1, ge=1, le=64)
    max_archive_size: int = Field(2 * 2**30, ge=1024)  # bytes of an uploaded archive
    max_archive_expanded: int = Field(8 * 2**30, ge=1024)  # bytes it may expand to (zip bombs stop here)
    max_archive_entries: int = Field(200_000, ge=1)
    max_url_list_items: int = Field(100_000, ge=1)
    url_timeout_seconds: float = Field(10.0, gt=0, le=600)
    url_concurrency: int = Field(4, ge=1, le=64)  # downloads at once in one chunk
    # Downloads of private, loopback, link-local and reserved addresses are refused (SSRF) unless this is set.
    allow_private_urls: bool = False
    # The catalogue map (/map): at most MAP_POINTS images, a uniform sample kept by the database as images come
    # and go; its axes are refitted once MAP_REFIT_CHANGES changes (change numbers) arrived since the last fit.
    # A request is served the last map at once; a stale one is refreshed in the background, at most every
    # MAP_REFRESH_SECONDS.
    map_points: int = Field(2000, ge=10, le=100_000)
    map_refit_changes: int = Field(1000, ge=1)
    map_refresh_seconds: float = Field(2.0, ge=0)
    # Cosine at or above which a stored image counts as a near-duplicate (measured: backend/evaluation/duplicates.py).
    near_duplicate_threshold: float = Field(0.91, ge=0.5, le=1.0)
    # Images whose near-duplicate links the server searches per tick when they were stored without (workers,
    # populate, a catalogue from before the links): `duplicates backfill` does the same from the CLI.
    near_duplicate_link_chunk: int = Field(1000, ge=1, le=100_000)

    # Datasets
    cifar10_dir: Path | None = None
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")

    @model_validator(mode="after")
    def _grace_outlasts_a_switch(self) -> "Settings":
        least = SHARD_EPOCH_CHECK_S + 2 * self.shard_deadline_seconds
        if self.shard_grace_seconds < least:
            raise ValueError(
                f"SHARD_GRACE_SECONDS={self.shard_grace_seconds:g} must be at least {least:g} (one epoch check "
                "plus twice SHARD_DEADLINE_SECONDS): routers must have switched before the old epoch is killed"
            )
        return self

    @field_validator("model_name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
        return name

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str | None) -> str | None:
        if not value:
            return None
        host, _, port = value.rpartition(":")
        if value != "auto" and not (host and port.isdigit()):
            raise ValueError(f"{value!r}: `auto` or host:port of a Ray cluster's head")
        return value

    @field_validator("faiss_index_type", mode="before")
    @classmethod
    def _index_type(cls, value: object) -> object:
        return parse_kind(value)

    @field_validator("vector_codec")
    @classmethod
    def _codec(cls, value: str) -> str:
        return parse_codec(value)

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, url: str | None) -> str | None:
        if not url:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ValueError("not a database URL (expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE)") from None
        if parsed.get_backend_name() not in ("postgresql", "postgres"):
            raise ValueError(f"{parsed.get_backend_name()!r} is not PostgreSQL (expected postgresql://...)")
        return url

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        hosts = [h.strip().lower() for h in value.split(",") if h.strip()]
        for host in hosts:
            if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
                raise ValueError(f"{host!r}: a host name, an address, '*.example.com' or '*'")
        return hosts

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        origins = [o.strip().rstrip("/") for o in value.split(",") if o.strip()]
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
                raise ValueError(f"{origin!r} is not an origin (expected scheme://host[:port], e.g. https://app.example.com)")
        return origins

    def prepare_data_dir(self) -> Path:
        """DATA_DIR, created if missing; ConfigurationError unless it is a directory we can write to."""
        path = self.data_dir
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigurationError(f"DATA_DIR {path} is not a directory") from None
        except OSError as exc:
            raise ConfigurationError(f"DATA_DIR {path} cannot be created: {exc.strerror}") from None
        if not path.is_dir():
            raise ConfigurationError(f"DATA_DIR {path} is not a directory")
        try:  # a real write: permission bits say nothing about a read-only mount, or to root
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise ConfigurationError(f"DATA_DIR {path} is not writable: {exc.strerror}") from None
        return path

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def onnx_dir(self) -> Path:
        return self.onnx_cache_dir or self.cache_dir / "onnx"

    @property
    def admin_key_file(self) -> Path:
        return self.data_dir / "admin.key"

    @property
    def uses_embedded_db(self) -> bool:
        return not self.database_url and not self.db_host


@lru_cache
def get_settings() -> Settings:
    return Settings()
