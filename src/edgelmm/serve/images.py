"""Images from request bodies: data URLs always, local files only under the folder the operator
names (`--allowed-local-media-path DIR`, as vLLM has it).

Remote http(s) URLs are never fetched: a server that downloads what a client names can be made
to reach hosts behind it. A local path is resolved (symlinks and `..` included) and must lie
inside the allowed folder; a file that is missing, unreadable or outside it gets the same
answer, so a client cannot learn which files exist. Sizes are checked before decoding (bytes)
and before pixels are allocated (width x height), so a small compressed file cannot expand into
gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from edgelmm.serve.errors import ApiError
from edgelmm.serve.schemas import Limits


def _local_file(url: str, parsed_path: str, scheme: str, media_dir: Path, limits: Limits) -> bytes:
    unavailable = ApiError(400, f"image file not available: {url} (local images must be readable files under the "
                           "folder this server allows)", param="image_url")
    try:
        path = Path(unquote(parsed_path) if scheme == "file" else url).resolve()
        if not path.is_relative_to(media_dir.resolve()) or not path.is_file():
            raise unavailable
        if path.stat().st_size > limits.max_image_bytes:
            raise ApiError(413, f"image larger than {limits.max_image_bytes // 2**20} MiB", param="image_url")
        return path.read_bytes()
    except (OSError, ValueError):
        raise unavailable from None


def _bytes_of(url: str, limits: Limits, media_dir: Path | None) -> bytes:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, "image data URLs must be base64: data:image/png;base64,...", param="image_url")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(413, f"image larger than {limits.max_image_bytes // 2**20} MiB", param="image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image data URL is not valid base64", param="image_url") from None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise ApiError(400, "remote image URLs are not fetched; send the image as a data URL", param="image_url")
    if parsed.scheme not in ("file", ""):
        raise ApiError(400, f"unsupported image URL scheme '{parsed.scheme}'; send a data URL", param="image_url")
    if media_dir is None:
        raise ApiError(400, "local image files are disabled on this server (start it with --allowed-local-media-path "
                       "DIR); send a data URL", param="image_url")
    return _local_file(url, parsed.path, parsed.scheme, media_dir, limits)


def load_image(url: str, limits: Limits, media_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image, or an ApiError that says what was wrong with it."""
    data = _bytes_of(url, limits, media_dir)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ApiError(413, f"image is {width}x{height} pixels, more than {limits.max_image_pixels} allowed", param="image_url")
        image.load()
        return image.convert("RGB")
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ApiError(400, f"cannot decode the image: {exc}", param="image_url") from None
