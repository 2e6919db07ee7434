"""Catalogue jobs: hand over an archive, a URL list or a server folder; watch it; cancel it (backend/jobs/).

Creating a job answers 202 with its id at once; staging (extracting an archive, reading a folder) runs in
a background thread of this server, resumed after a crash (backend/jobs/staging.py), the chunks on any worker."""

import csv
import io
import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from backend.api.deps import BIGINT_MAX, JobsDep, OneFile, SearchDep, SettingsDep
from backend.api.errors import error_responses
from backend.api.security import Access, guard
from backend.core.errors import InvalidInput, Unprocessable
from backend.core.text import echo
from backend.schemas import JobOut

router = APIRouter(prefix="/jobs", tags=["jobs"])
ARCHIVE_PATH = "/jobs/archive"


class UrlList(BaseModel):
    urls: list[str] = Field(min_length=1, description="image URLs; or send a CSV/text file as multipart `file`")
    category: str | None = Field(None, description="category for every URL (a CSV row's own wins)")


class ReembedJob(BaseModel):
    model: str = Field(min_length=1, max_length=64, description="a model name, e.g. efficientnet_lite2 (see /status)")


class FolderJob(BaseModel):
    path: str = Field(min_length=1, max_length=4096, description="a `<category>/<images>` folder on the server")


def _created_by(request: Request) -> str | None:
    return getattr(request.state, "api_key", None)  # the prefix of the key that asked (security.guard)


@router.post(
    "/archive",
    status_code=202,
    response_model=JobOut,
    dependencies=[guard(Access.WRITE), OneFile],
    responses=error_responses(400, 413, 422),
)
def create_archive_job(
    request: Request,
    jobs: JobsDep,
    search: SearchDep,
    file: Annotated[UploadFile, File(description=".zip, .tar or .tar.gz")],
) -> JobOut:
    """Ingest an archive laid out as `<category>/<images>`: extracted safely, then embedded by workers."""
    job_id = jobs.create("archive", search.model, {"filename": echo(file.filename or "archive")}, _created_by(request))

    def copy(part: Path) -> None:
        with open(part, "wb") as out:
            shutil.copyfileobj(file.file, out, 1 << 20)  # Starlette spooled it to disk; BodyLimit capped it

    return jobs.start_with_input(job_id, copy)


@router.post(
    "/urls",
    status_code=202,
    response_model=JobOut,
    dependencies=[guard(Access.WRITE)],
    responses=error_responses(400, 413, 422),
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": UrlList.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            }
        }
    },
)
async def create_url_job(request: Request, jobs: JobsDep, search: SearchDep, settings: SettingsDep) -> JobOut:
    """Ingest images from URLs: a JSON list, or a file with one URL a line or CSV `url[,category[,description]]`."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = UrlList.model_validate_json(await request.body())
        except ValueError as exc:
            raise Unprocessable(f'expected {{"urls": [...]}}: {exc}') from None
        buffer = io.StringIO()
        csv.writer(buffer).writerows([url, body.category or ""] for url in body.urls)
        text = buffer.getvalue()
    else:
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise Unprocessable("file: send the URL list as a file in the field 'file', or JSON {\"urls\": [...]}")
        raw = await upload.read(settings.max_upload_size + 1)
        if len(raw) > settings.max_upload_size:
            raise InvalidInput(f"URL list larger than MAX_UPLOAD_SIZE ({settings.max_upload_size:,} bytes)")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidInput("the URL list is not UTF-8 text") from None
    job_id = await run_in_threadpool(jobs.create, "urls", search.model, {}, _created_by(request))
    return await run_in_threadpool(jobs.stage_urls, job_id, text)


@router.post(
    "/folder", status_code=202, response_model=JobOut, dependencies=[guard(Access.ADMIN)], responses=error_responses(400, 422)
)
def create_folder_job(request: Request, body: FolderJob, jobs: JobsDep, search: SearchDep) -> JobOut:
    """Ingest a `<category>/<images>` folder on the server's disk (links are not followed out of it)."""
    folder = Path(body.path)
    if not folder.is_absolute() or not folder.is_dir():
        raise InvalidInput(f"not a folder on the server (an absolute path is needed): {echo(body.path)}")
    return jobs.start(jobs.create("folder", search.model, {"path": str(folder)}, _created_by(request)))


@router.post(
    "/reembed", status_code=202, response_model=JobOut, dependencies=[guard(Access.ADMIN)], responses=error_responses(400, 422)
)
def create_reembed_job(request: Request, body: ReembedJob, jobs: JobsDep, settings: SettingsDep) -> JobOut:
    """Embed every stored image that lacks it with another model (its vectors are kept apart; a server with
    MODEL_NAME set to it then searches them)."""
    from backend.core.embedding_models import MODEL_NAMES
    from backend.embedding.registry import model_id

    if body.model not in MODEL_NAMES:
        raise Unprocessable(f"model: unknown model {echo(body.model)!r}; choose one of: {', '.join(MODEL_NAMES)}")
    target = model_id(settings, body.model)  # the weights load in the workers, not here
    return jobs.start(jobs.create("reembed", target, {"model_name": body.model}, _created_by(request)))


@router.get("", response_model=list[JobOut], dependencies=[guard(Access.SEARCH)])
def list_jobs(jobs: JobsDep) -> list[JobOut]:
    """The newest 50 jobs, newest first."""
    return jobs.newest()


@router.get("/{job_id:int}", response_model=JobOut, dependencies=[guard(Access.SEARCH)], responses=error_responses(404, 422))
def get_job(job_id: int, jobs: JobsDep) -> JobOut:
    return jobs.get(_checked(job_id))


@router.post(
    "/{job_id:int}/cancel", response_model=JobOut, dependencies=[guard(Access.WRITE)], responses=error_responses(404, 422)
)
def cancel_job(job_id: int, jobs: JobsDep) -> JobOut:
    """No chunk commits after this; chunks that committed before stay in the catalogue. The job's files go."""
    return jobs.cancel(_checked(job_id))


def _checked(job_id: int) -> int:
    if not 1 <= job_id <= BIGINT_MAX:
        raise Unprocessable(f"job_id: must be between 1 and {BIGINT_MAX}")
    return job_id
