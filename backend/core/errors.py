"""Errors a user can act on. Each carries one human-readable line and the HTTP status it maps to."""


class AppError(Exception):
    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(AppError):
    status_code = 400


class InvalidImage(InvalidInput):
    pass


class Unauthorized(AppError):
    status_code = 401


class Forbidden(AppError):
    status_code = 403


class NotFound(AppError):
    status_code = 404


class PayloadTooLarge(AppError):
    status_code = 413


class Conflict(AppError):
    status_code = 409


class Unprocessable(AppError):
    status_code = 422


class ConfigurationError(AppError):
    status_code = 500


class DatabaseUnavailable(AppError):
    status_code = 503


class ModelUnavailable(AppError):
    status_code = 503
