"""Images for vision models: where they come from (data URLs, files, MessagePack bytes), decoding
them in memory with Pillow, the limits every image must pass, and the resize budget.

Decoding runs on a worker thread before a request reaches the engine, so a big JPEG never holds up
the model. Every refusal is -32602 with data.path naming the image (message and part index)."""

import base64
import binascii
import collections
import hashlib
import io
import logging
import os
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import INVALID_PARAMS, RpcError, internal

log = logging.getLogger(__name__)

MAX_IMAGES = 16                 # images per request
MAX_IMAGE_BYTES = 48 << 20      # encoded bytes per image (files, data URLs, bin)
MAX_SOURCE_PIXELS = 64_000_000  # declared width x height; larger is refused before decoding
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
LOW_DETAIL_SIDE = 512           # detail "low" caps the longest side here
DECODED_CACHE_BYTES = 32 << 20  # decoded images kept for the same bytes asked about again


def _total_ram() -> int | None:
    """Physical memory in bytes, from the OS (Linux: sysconf; macOS: sysctl)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import subprocess

        return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=2).stdout)
    except Exception:
        return None


def default_max_side(ram: int | None = None) -> int:
    """MLX Inference Server's tiers: longest side 1024 at >= 64 GB, 768 at >= 32 GB, else 512."""
    ram = _total_ram() if ram is None else ram
    gb = (ram or 0) / (1 << 30)
    return 1024 if gb >= 64 else 768 if gb >= 32 else 512


@dataclass
class Options:
    """The runtime's image settings (command-line flags)."""
    max_side: int = 0                 # 0: chosen from the machine's memory
    max_images: int = MAX_IMAGES
    allow_remote: bool = False        # http(s) image URLs (off: the runtime never reaches the network by surprise)

    def __post_init__(self):
        if not self.max_side:
            self.max_side = default_max_side()


@dataclass
class Image:
    """One decoded image, ready for a processor."""
    pil: object
    sha256: str
    path: str                         # JSON Pointer of its part in the request
    source_size: tuple[int, int]      # (width, height) as sent, after EXIF rotation
    size: tuple[int, int]             # after the resize budget
    info: dict = field(default_factory=dict)


def _bad(message: str, path: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message, path=path)


# ---- which parts are images ----
def image_parts(params: dict) -> list[tuple[dict, str]]:
    """(part, JSON Pointer) for every image in a generate request, in prompt order."""
    found = []
    for i, m in enumerate(params.get("messages") or ()):
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") in ("image_url", "image"):
                    found.append((part, f"/messages/{i}/content/{j}"))
    for k, part in enumerate(params.get("images") or ()):
        found.append((part, f"/images/{k}"))
    return found


# ---- bytes from a part ----
def _read_file(path: Path, where: str) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _bad(f"{where}: image file {str(path)!r} does not exist", where) from None
    except OSError as e:
        raise _bad(f"{where}: cannot read image file {str(path)!r}: {e.strerror}", where) from None
    import stat

    if not stat.S_ISREG(st.st_mode):
        raise _bad(f"{where}: {str(path)!r} is not a regular file", where)
    if st.st_size > MAX_IMAGE_BYTES:
        raise _bad(f"{where}: image file {str(path)!r} has {st.st_size} bytes, more than the limit of {MAX_IMAGE_BYTES}", where)
    try:
        with open(path, "rb") as f:
            return f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        raise _bad(f"{where}: cannot read image file {str(path)!r}: {e.strerror}", where) from None


def _data_url(url: str, where: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise _bad(f"{where}: a data URL needs a comma before its payload (data:image/png;base64,...)", where)
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise _bad(f"{where}: the data URL carries more than {MAX_IMAGE_BYTES} bytes", where)
    if head.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}: the data URL's base64 payload is not valid base64", where) from None
    return urllib.parse.unquote_to_bytes(payload)


def _fetch(url: str, where: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            data = r.read(MAX_IMAGE_BYTES + 1)
    except Exception as e:
        raise _bad(f"{where}: could not fetch {url!r}: {e}", where) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise _bad(f"{where}: {url!r} is larger than {MAX_IMAGE_BYTES} bytes", where)
    return data


def part_bytes(part: dict, where: str, options: Options) -> tuple[bytes, str]:
    """The encoded bytes of an image part, and the pointer to blame for them."""
    if part.get("type") == "image":
        data = part.get("data")
        if not isinstance(data, (bytes, bytearray)):
            raise _bad(f"{where}/data: an image part's data must be raw bytes (MessagePack bin); over NDJSON or LSP send "
                       "{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}} instead", where + "/data")
        if len(data) > MAX_IMAGE_BYTES:
            raise _bad(f"{where}/data: {len(data)} bytes, more than the limit of {MAX_IMAGE_BYTES}", where + "/data")
        return bytes(data), where + "/data"
    url = part["image_url"]["url"]
    where_url = where + "/image_url/url"
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, where_url), where_url
    if scheme in ("http", "https"):
        if not options.allow_remote:
            raise _bad(f"{where_url}: http(s) image URLs are refused (the runtime does not reach the network unless started with "
                       "--allow-remote-images); send a data: URL, an absolute file path or MessagePack bytes", where_url)
        return _fetch(url, where_url), where_url
    if scheme == "file":
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise _bad(f"{where_url}: file URLs must name a local file (file:///path), not host {parsed.netloc!r}", where_url)
        path = Path(urllib.parse.unquote(parsed.path))
        if not path.is_absolute():
            raise _bad(f"{where_url}: a file URL needs an absolute path (file:///path)", where_url)
        return _read_file(path, where_url), where_url
    if url.startswith("/") or (len(url) > 2 and url[1] == ":" and url[2] in "\\/"):
        return _read_file(Path(url), where_url), where_url
    raise _bad(f"{where_url}: not an image source this runtime reads; send a data: URL, an absolute file path, a file:// URL "
               "or MessagePack bytes", where_url)


# ---- decoding ----
def decode(data: bytes, where: str, max_side: int) -> Image:
    """Decode in memory, honour EXIF orientation, and shrink to max_side (never enlarge, no re-encode)."""
    from PIL import Image as PILImage, ImageOps, UnidentifiedImageError

    digest = hashlib.sha256(data).hexdigest()
    seen = _decoded.get((digest, max_side))
    if seen is not None:   # the same bytes at the same budget: decoded before
        pil, source = seen
        return Image(pil=pil, sha256=digest, path=where, source_size=source, size=pil.size)
    try:
        im = PILImage.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise _bad(f"{where}: not an image in a supported format ({', '.join(FORMATS)})", where) from None
    except PILImage.DecompressionBombError as e:
        raise _bad(f"{where}: refused as a decompression bomb: {e}", where) from None
    except Exception as e:
        raise _bad(f"{where}: cannot read this image: {e}", where) from None
    width, height = im.size
    # Only the header has been read: refuse huge declared sizes before any pixel is allocated.
    if width * height > MAX_SOURCE_PIXELS or width <= 0 or height <= 0:
        raise _bad(f"{where}: the image declares {width}x{height} pixels, more than the limit of {MAX_SOURCE_PIXELS} "
                   "(a decompression bomb, or simply too large); shrink it first", where)
    try:
        if im.format == "JPEG" and max(width, height) > 2 * max_side:
            im.draft("RGB", (max_side, max_side))   # decode JPEGs at a reduced scale: less memory and time
        im.load()
        turned = im.getexif().get(0x0112) in (5, 6, 7, 8)   # EXIF orientations that swap the sides
        im = ImageOps.exif_transpose(im)
        if im.mode != "RGB":
            im = _to_rgb(im)
    except PILImage.DecompressionBombError as e:
        raise _bad(f"{where}: refused as a decompression bomb: {e}", where) from None
    except Exception as e:
        raise _bad(f"{where}: the image data is corrupt or truncated ({type(e).__name__}: {e})", where) from None
    source = (height, width) if turned else (width, height)
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), PILImage.Resampling.BICUBIC)
    _decoded.put((digest, max_side), (im, source), im.width * im.height * len(im.getbands()))
    return Image(pil=im, sha256=digest, path=where, source_size=source, size=im.size)


class _Decoded:
    """Decoded images by content hash and budget, newest last, bounded by bytes (worker thread)."""

    def __init__(self, max_bytes: int = DECODED_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict = collections.OrderedDict()   # key → (value, nbytes)
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            hit = self.entries.get(key)
            if hit is None:
                return None
            self.entries.move_to_end(key)
            return hit[0]

    def put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self.lock:
            self.entries[key] = (value, nbytes)
            while sum(n for _, n in self.entries.values()) > self.max_bytes:
                self.entries.popitem(last=False)


_decoded = _Decoded()


def _to_rgb(im):
    """RGB, with transparent areas on white (not black)."""
    from PIL import Image as PILImage

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        back = PILImage.new("RGB", rgba.size, (255, 255, 255))
        back.paste(rgba, mask=rgba.getchannel("A"))
        return back
    return im.convert("RGB")


def load_all(params: dict, options: Options) -> list[Image]:
    """Every image of a request, decoded and sized, or -32602 naming the first bad one."""
    parts = image_parts(params)
    if len(parts) > options.max_images:
        raise _bad(f"{len(parts)} images in one request, more than the limit of {options.max_images}",
                   parts[options.max_images][1])
    side = params.get("max_image_side") or options.max_side
    out = []
    for part, where in parts:
        data, blame = part_bytes(part, where, options)
        detail = (part.get("image_url") or {}).get("detail")
        out.append(decode(data, blame, min(side, LOW_DETAIL_SIDE) if detail == "low" else side))
    return out


# ---- off the engine thread ----
_pool = None
_lock = threading.Lock()


def decode_then(ctx, gen, then) -> None:
    """Decode gen's images on the worker, then call then(); a bad image is answered -32602 there."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-sidecar-images")
    _pool.submit(_job, ctx, gen, then)


def _job(ctx, gen, then) -> None:
    req = gen.req
    if req.cancel_requested:
        return
    try:
        gen.images = load_all(gen.params, getattr(ctx, "images", None) or Options())
    except RpcError as e:
        req.fail(e)
        return
    except Exception as e:
        log.exception("could not read the images of a request")
        req.fail(internal("generate", e))
        return
    then()
