"""Catalogue jobs: hand over an archive, a URL list or a server folder; watch it; cancel it (backend/jobs/).

Creating a job answers 202 with its id at once; staging (extracting an archive, reading a folder) runs in
a background thread of this server, resumed after a crash (backend/jobs/staging.py), the chunks on any worker."""

import csv
import io
import shutil
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Request, UploadFile
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from backend import jobs
from backend.api.deps import BIGINT_MAX, OneFile, ServiceDep, SettingsDep
from backend.api.errors import error_responses
from backend.api.security import Access, guard
from backend.core.errors import InvalidInput, Unprocessable
from backend.core.text import echo

router = APIRouter(prefix="/jobs", tags=["jobs"])
ARCHIVE_PATH = "/jobs/archive"


class JobOut(BaseModel):
    id: int
    kind: str
    state: str  # queued, running, succeeded, failed, cancelled
    message: str | None
    total: int
    done: int
    added: int
    duplicates: int
    failed: int
    skipped: int  # archive entries or files left out (links, paths leaving the folder, not images)
    progress: float  # done / total, 0 to 1
    images_per_s: float | None
    failures: list[dict[str, str]]  # the first 100: source and reason
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Any) -> "JobOut":
        return cls(
            id=job.id,
            kind=job.kind,
            state=job.state,
            message=job.message,
            total=job.total,
            done=job.done,
            added=job.added,
            duplicates=job.duplicates,
            failed=job.failed,
            skipped=job.skipped,
            progress=(job.done / job.total) if job.total else (1.0 if job.state in jobs.FINAL else 0.0),
            images_per_s=jobs.images_per_second(job),
            failures=job.failures,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class UrlList(BaseModel):
    urls: list[str] = Field(min_length=1, description="image URLs; or send a CSV/text file as multipart `file`")
    category: str | None = Field(None, description="category for every URL (a CSV row's own wins)")


class ReembedJob(BaseModel):
    model: str = Field(min_length=1, max_length=64, description="a model name, e.g. efficientnet_lite2 (see /status)")


class FolderJob(BaseModel):
    path: str = Field(min_length=1, max_length=4096, description="a `<category>/<images>` folder on the server")


def _queue(request: Request) -> Any:
    return request.app.state.jobs_app


def _create(request: Request, service: Any, settings: Any, kind: str, model: str, params: dict) -> int:
    return jobs.create_job(settings, service.engine, kind, model, params, getattr(request.state, "api_key", None))


@router.post(
    "/archive",
    status_code=202,
    response_model=JobOut,
    dependencies=[guard(Access.WRITE), OneFile],
    responses=error_responses(400, 413, 422),
)
def create_archive_job(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description=".zip, .tar or .tar.gz")],
) -> JobOut:
    """Ingest an archive laid out as `<category>/<images>`: extracted safely, then embedded by workers."""
    job_id = _create(request, service, settings, "archive", service.model, {"filename": echo(file.filename or "archive")})

    def copy(part: Path) -> None:
        with open(part, "wb") as out:
            shutil.copyfileobj(file.file, out, 1 << 20)  # Starlette spooled it to disk; BodyLimit capped it

    jobs.save_input(settings, job_id, copy)  # a crash from here on is resumed by the next start
    jobs.start(settings, service.engine, _queue(request), job_id)
    return JobOut.of(jobs.get_job(service.engine, job_id))


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
async def create_url_job(request: Request, service: ServiceDep, settings: SettingsDep) -> JobOut:
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
    job_id = await run_in_threadpool(_create, request, service, settings, "urls", service.model, {})
    await run_in_threadpool(jobs.stage_urls, settings, service.engine, _queue(request), job_id, text)
    return JobOut.of(await run_in_threadpool(jobs.get_job, service.engine, job_id))


@router.post(
    "/folder", status_code=202, response_model=JobOut, dependencies=[guard(Access.ADMIN)], responses=error_responses(400, 422)
)
def create_folder_job(request: Request, body: FolderJob, service: ServiceDep, settings: SettingsDep) -> JobOut:
    """Ingest a `<category>/<images>` folder on the server's disk (links are not followed out of it)."""
    folder = Path(body.path)
    if not folder.is_absolute() or not folder.is_dir():
        raise InvalidInput(f"not a folder on the server (an absolute path is needed): {echo(body.path)}")
    job_id = _create(request, service, settings, "folder", service.model, {"path": str(folder)})
    jobs.start(settings, service.engine, _queue(request), job_id)
    return JobOut.of(jobs.get_job(service.engine, job_id))


@router.post(
    "/reembed", status_code=202, response_model=JobOut, dependencies=[guard(Access.ADMIN)], responses=error_responses(400, 422)
)
def create_reembed_job(request: Request, body: ReembedJob, service: ServiceDep, settings: SettingsDep) -> JobOut:
    """Embed every stored image that lacks it with another model (its vectors are kept apart; a server with
    MODEL_NAME set to it then searches them)."""
    from backend.embedding.models import MODEL_NAMES
    from backend.embedding.registry import model_id

    if body.model not in MODEL_NAMES:
        raise Unprocessable(f"model: unknown model {echo(body.model)!r}; choose one of: {', '.join(MODEL_NAMES)}")
    target = model_id(settings, body.model)  # the weights load in the workers, not here
    job_id = _create(request, service, settings, "reembed", target, {"model_name": body.model})
    jobs.start(settings, service.engine, _queue(request), job_id)
    return JobOut.of(jobs.get_job(service.engine, job_id))


@router.get("", response_model=list[JobOut], dependencies=[guard(Access.SEARCH)])
def list_jobs(service: ServiceDep) -> list[JobOut]:
    """The newest 50 jobs, newest first."""
    return [JobOut.of(job) for job in jobs.list_jobs(service.engine)]


@router.get("/{job_id:int}", response_model=JobOut, dependencies=[guard(Access.SEARCH)], responses=error_responses(404, 422))
def get_job(job_id: int, service: ServiceDep) -> JobOut:
    return JobOut.of(jobs.get_job(service.engine, _checked(job_id)))


@router.post(
    "/{job_id:int}/cancel", response_model=JobOut, dependencies=[guard(Access.WRITE)], responses=error_responses(404, 422)
)
def cancel_job(job_id: int, service: ServiceDep, settings: SettingsDep) -> JobOut:
    """No chunk commits after this; chunks that committed before stay in the catalogue. The job's files go."""
    job = jobs.cancel_job(service.engine, _checked(job_id))
    jobs.remove_job_files(settings, job.id)
    return JobOut.of(job)


def _checked(job_id: int) -> int:
    if not 1 <= job_id <= BIGINT_MAX:
        raise Unprocessable(f"job_id: must be between 1 and {BIGINT_MAX}")
    return job_id
