"""Query images given by address: downloaded under the same SSRF-safe, size- and time-bounded rules as
URL ingestion (`backend.sources.urls.fetch`), for the API and the CLI alike."""

from urllib.parse import urlsplit

from backend.core.config import Settings
from backend.core.errors import Unprocessable
from backend.core.text import echo
from backend.imaging import DecodedImage, decode_image
from backend.sources.urls import FetchFailed, FetchLimits, UrlRefused, fetch

URL_MAX = 2000  # characters in a query image's address


def fetch_limits(settings: Settings) -> FetchLimits:
    """The bounds every download runs under: URL_TIMEOUT_SECONDS, MAX_UPLOAD_SIZE, ALLOW_PRIVATE_URLS."""
    return FetchLimits(settings.url_timeout_seconds, settings.max_upload_size, allow_private=settings.allow_private_urls)


def is_url(text: str) -> bool:
    return urlsplit(text.strip()).scheme.lower() in ("http", "https")


def image_from_url(url: str, settings: Settings) -> DecodedImage:
    """The decoded image at `url`. A URL that may not be fetched (scheme, length, an address inside the
    network) is Unprocessable; a download that fails says why (InvalidInput, like a bad upload)."""
    url = url.strip()
    if len(url) > URL_MAX:
        raise Unprocessable(f"url: longer than {URL_MAX} characters")
    if not is_url(url) or not urlsplit(url).hostname:
        raise Unprocessable(f"url: not an http(s) URL: {echo(url)!r}")
    try:
        data = fetch(url, fetch_limits(settings))
    except UrlRefused as exc:
        raise Unprocessable(f"url: {exc.message}") from None
    except FetchFailed as exc:
        raise FetchFailed(f"url {echo(url)}: {exc.message}") from None
    return decode_image(data, settings.max_image_pixels, name=echo(url))
