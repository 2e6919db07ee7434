"""FastAPI dependencies and parameter types shared by the routes: the services built at start-up (one
narrow, named dependency each), the settings, bounded ids, validated names and text, and exactly one
uploaded file."""

from typing import Annotated

from fastapi import Depends, Path, Request
from pydantic import AfterValidator, BeforeValidator
from starlette.datastructures import UploadFile  # what a parsed form holds (fastapi's is a subclass)

from backend.core.config import Settings
from backend.core.errors import Unprocessable
from backend.core.text import NAME_MAX, NAME_PATTERN, TEXT_MAX, TEXT_PATTERN, clean_name, clean_text
from backend.services.assembly import Services
from backend.services.catalogue import Catalogue
from backend.services.index_lifecycle import IndexLifecycle
from backend.services.jobs import Jobs
from backend.services.search import SearchService
from backend.services.writes import CatalogueWrites

BIGINT_MAX = 2**63 - 1  # ids and offsets are PostgreSQL bigints: larger values are a 422, not a database error


# async: no worker thread for a lookup
def services_of(request: Request) -> Services:
    return request.app.state.services


async def get_search(request: Request) -> SearchService:
    return services_of(request).search


async def get_catalogue(request: Request) -> Catalogue:
    return services_of(request).catalogue


async def get_jobs(request: Request) -> Jobs:
    return services_of(request).jobs


async def get_lifecycle(request: Request) -> IndexLifecycle:
    return services_of(request).lifecycle


async def get_writes(request: Request) -> CatalogueWrites:
    return services_of(request).writes


async def get_settings_dep(request: Request) -> Settings:
    return services_of(request).settings


async def one_file(request: Request) -> None:
    """The multipart field `file` holds exactly one file: not a text field, and not two files of which
    the last would silently win."""
    form = await request.form()  # parsed once: the route's own File() parameter reuses it
    files = form.getlist("file")
    if len(files) > 1:
        raise Unprocessable(f"file: send one file in the field 'file', not {len(files)}")
    if files and not isinstance(files[0], UploadFile):
        raise Unprocessable("file: must be a file upload (multipart/form-data with a filename), not a text field")


def _blank_is_none(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


SearchDep = Annotated[SearchService, Depends(get_search)]  # search, upload
LifecycleDep = Annotated[IndexLifecycle, Depends(get_lifecycle)]  # status, readiness, rebuilds
WritesDep = Annotated[CatalogueWrites, Depends(get_writes)]  # delete, prototypes
CatalogueDep = Annotated[Catalogue, Depends(get_catalogue)]  # every catalogue read
JobsDep = Annotated[Jobs, Depends(get_jobs)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
OneFile = Depends(one_file)
ImageId = Annotated[int, Path(ge=1, le=BIGINT_MAX, description="image id")]
CategoryId = Annotated[int, Path(ge=1, le=BIGINT_MAX, description="category id")]
# What clean_name and clean_text accept, said in the OpenAPI schema (they check it, with clearer messages).
NAME_SCHEMA = {"pattern": NAME_PATTERN, "maxLength": NAME_MAX}
TEXT_SCHEMA = {"pattern": TEXT_PATTERN, "maxLength": TEXT_MAX}
CategoryName = Annotated[str, AfterValidator(clean_name)]
OptionalCategoryName = Annotated[str | None, BeforeValidator(_blank_is_none), AfterValidator(lambda v: v and clean_name(v))]
Description = Annotated[str | None, AfterValidator(clean_text)]
