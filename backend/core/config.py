"""All settings in one place, read from the environment and `.env` (see `.env.example`)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]

ModelName = Literal["efficientnet_lite0", "efficientnet_lite2", "resnet18", "resnet50"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=PROJECT_ROOT / ".env", env_file_encoding="utf-8", extra="ignore", protected_namespaces=()
    )

    # Database: DATABASE_URL wins; else DB_HOST & co; else an embedded PostgreSQL under DATA_DIR.
    database_url: str | None = None
    db_host: str | None = None
    db_port: int = 5432
    db_name: str = "imsrc"
    db_user: str = "postgres"
    db_password: str = ""

    data_dir: Path = PROJECT_ROOT / "data"

    # Embedding model
    model_name: ModelName = "efficientnet_lite0"
    model_weights: str | None = None  # local weights file (torchvision models); "random" only for tests
    device: Literal["auto", "cpu", "cuda"] = "auto"
    embed_batch_size: int = Field(32, ge=1, le=1024)
    image_size: int | None = Field(None, ge=32, le=1024)  # model input side; None = the model's own
    # auto: ONNX Runtime on CPU when installed (about 3x faster here), else PyTorch
    embed_runtime: Literal["auto", "torch", "onnx"] = "auto"

    # Index and search
    faiss_index_type: Literal["flat"] = "flat"
    use_prototype_filtering: bool = True
    default_top_categories: int = Field(3, ge=1, le=10)
    default_search_limit: int = Field(10, ge=1, le=50)
    # The server checks this often whether the database moved on without it (e.g. a CLI populate) and
    # rebuilds its index from the stored vectors if so; 0 turns the check off.
    index_refresh_seconds: float = Field(30.0, ge=0)

    # API
    api_host: str = "0.0.0.0"
    api_port: int = 8000
    max_upload_size: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # larger images are refused as decompression bombs

    # Datasets
    cifar10_dir: Path | None = None
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def uses_embedded_db(self) -> bool:
        return not self.database_url and not self.db_host


@lru_cache
def get_settings() -> Settings:
    return Settings()
