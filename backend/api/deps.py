"""FastAPI dependencies: the one SearchService built at start-up, and the settings."""

from typing import Annotated

from fastapi import Depends, Request

from backend.core.config import Settings
from backend.service import SearchService


def get_service(request: Request) -> SearchService:
    return request.app.state.service


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.service.settings


ServiceDep = Annotated[SearchService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
