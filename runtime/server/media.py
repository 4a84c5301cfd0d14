"""Image URLs of a request -> encoded image bytes, under the server's media policy.

`data:` URIs are always accepted. `http(s)` URLs are fetched only from hosts named by
--allowed-media-domains and `file://` URLs are read only under --allowed-local-media-path;
anything else is refused. Every image is size-checked (encoded bytes) and its header is read
to refuse decompression bombs (decoded pixels) and formats outside image_processor.IMAGE_FORMATS
(PostScript sent as `data:image/png` never reaches Ghostscript) before the engine decodes it.
Errors are `APIError`s naming the request field the URL came from.
"""
from __future__ import annotations

import asyncio
import io
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

from ..image_processor import ImageFormatError, decode_data_uri, open_image
from .protocol import APIError, ImageRef


@dataclass(frozen=True)
class MediaPolicy:
    max_image_bytes: int = 64 * 1024 * 1024  # encoded bytes of one image
    max_image_pixels: int = 89_478_485  # width x height of one decoded image (PIL's own default limit)
    allowed_domains: tuple[str, ...] = ()  # hosts http(s) image URLs may come from (exact, case-insensitive)
    allowed_local_path: Path | None = None  # file:// URLs must resolve under this directory
    fetch_timeout_s: float = 10.0


class MediaLoader:
    def __init__(self, policy: MediaPolicy):
        self.policy = policy
        self._domains = {d.lower().rstrip(".") for d in policy.allowed_domains}
        self._root = policy.allowed_local_path.resolve(strict=True) if policy.allowed_local_path else None
        self._client: httpx.AsyncClient | None = None  # created on the first allowed http(s) fetch

    async def load_all(self, refs: list[ImageRef], documents: bool = False) -> list[bytes]:
        return list(await asyncio.gather(*(self.load(ref, documents) for ref in refs)))

    async def load(self, ref: ImageRef, documents: bool = False) -> bytes:
        """-> the bytes of an image (or, with `documents`, of an image or a PDF)."""
        scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url else ""
        if scheme == "data":
            try:  # base64 of up to the body limit: ~100 ms for 64 MB, off the event loop
                data = await asyncio.to_thread(decode_data_uri, ref.url, documents)
            except ValueError as exc:
                raise APIError(f"'{ref.param}': {exc}", ref.param) from exc
        elif scheme in ("http", "https"):
            data = await self._fetch(ref)
        elif scheme == "file":
            data = await asyncio.to_thread(self._read_local, ref)
        else:
            raise APIError(f"'{ref.param}' must be a data: URI, an http(s) URL or a file:// URL, "
                           f"got {_short(ref.url)}", ref.param)
        self.check(data, ref.param, documents)
        return data

    def check(self, data: bytes, param: str, documents: bool = False) -> None:
        """Encoded bytes from request field `param` (an uploaded file's too): within the size and
        pixel limits and an image format we decode (or a PDF, with `documents`); else an APIError."""
        if len(data) > self.policy.max_image_bytes:
            raise APIError(f"'{param}': the {'file' if documents else 'image'} is {len(data)} bytes, more than the limit of "
                           f"{self.policy.max_image_bytes} bytes", param)
        if documents and data.startswith(b"%PDF-"):  # rendered page by page, at a bounded size
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
                width, height = open_image(io.BytesIO(data)).size  # reads the header only
        except Image.DecompressionBombError as exc:
            raise APIError(f"'{param}': refusing a decompression bomb ({exc})", param) from exc
        except ImageFormatError as exc:
            raise APIError(f"'{param}': {exc}", param) from None
        except Exception as exc:  # untrusted bytes: any failure means it is not an image we can read
            raise APIError(f"'{param}': not a decodable image ({type(exc).__name__})", param) from exc
        if width * height > self.policy.max_image_pixels:
            raise APIError(f"'{param}': the image is {width}x{height} = {width * height} pixels, more than "
                           f"the limit of {self.policy.max_image_pixels} decoded pixels", param)

    async def _fetch(self, ref: ImageRef) -> bytes:
        host = (urllib.parse.urlsplit(ref.url).hostname or "").lower().rstrip(".")
        if host not in self._domains:
            raise APIError(f"'{ref.param}': image URLs from host {host!r} are not allowed "
                           "(the server's --allowed-media-domains)", ref.param)
        if self._client is None:
            # No redirects: a redirect could lead to a host outside the allow-list.
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=self.policy.fetch_timeout_s)
        limit = self.policy.max_image_bytes
        try:
            async with self._client.stream("GET", ref.url) as response:
                if response.status_code != 200:
                    raise APIError(f"'{ref.param}': fetching the image gave HTTP {response.status_code}", ref.param)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise APIError(f"'{ref.param}': the image is more than the limit of {limit} bytes", ref.param)
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise APIError(f"'{ref.param}': cannot fetch the image ({type(exc).__name__})", ref.param) from exc
        return b"".join(chunks)

    def _read_local(self, ref: ImageRef) -> bytes:
        if self._root is None:
            raise APIError(f"'{ref.param}': file:// URLs are not allowed (the server's --allowed-local-media-path)",
                           ref.param)
        parts = urllib.parse.urlsplit(ref.url)
        if parts.netloc not in ("", "localhost"):
            raise APIError(f"'{ref.param}': file:// URLs must name a local path", ref.param)
        try:
            path = Path(urllib.request.url2pathname(parts.path)).resolve(strict=True)  # follows symlinks
        except (OSError, RuntimeError, ValueError):
            raise APIError(f"'{ref.param}': no such file under the allowed media path", ref.param) from None
        if not path.is_relative_to(self._root) or not path.is_file():
            raise APIError(f"'{ref.param}': {_short(ref.url)} is not a file under the allowed media path", ref.param)
        if path.stat().st_size > self.policy.max_image_bytes:
            raise APIError(f"'{ref.param}': the image is more than the limit of {self.policy.max_image_bytes} bytes",
                           ref.param)
        return path.read_bytes()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
