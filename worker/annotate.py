"""Evidence images: a step's screenshot with the acted element boxed and labelled, failures
marked, re-encoded compactly with thumbnails, within a size budget per job.

Pure functions over bytes, run on the artifact store's own threads: `prepare` as each step's
capture lands, `render` when the job's record is built (reusing what was prepared). Decoding,
drawing and encoding a 1280x800 image takes ~8 ms, time the event loop that other jobs share
must not lose — though Pillow's JPEG encoder holds the GIL while it works (~3 ms per image),
so a capture with nothing to draw is kept as the browser encoded it (`_as_captured`).

Secrets never reach this module: the browser masked them (and blurred the script's `redact:`
regions) before any pixel was captured, see `worker.evidence`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from worker.contract import Box

ImageFormat = Literal["webp", "jpeg"]

BOX_COLOR = (37, 99, 235)  # the acted element: blue
FAIL_COLOR = (220, 38, 38)  # a failed attempt: red frame and banner
BOX_WIDTH = 3
FRAME_WIDTH = 8
THUMB_WIDTH = 320
THUMB_QUALITY = 60
# Tried in order until a job's images fit its budget: quality first (cheap to lose), then size.
LADDER: tuple[tuple[int, float], ...] = (
    (80, 1.0),
    (65, 1.0),
    (50, 1.0),
    (50, 0.75),
    (40, 0.6),
    (35, 0.5),
)


@dataclass(frozen=True)
class Mark:
    """What to draw on one screenshot."""

    box: Box | None = None  # in CSS px; the capture is at device scale 1, so also image px
    label: str | None = None
    failure: str | None = None  # the failure code, when the attempt failed


@dataclass(frozen=True)
class Encoded:
    """One evidence image and its thumbnail, encoded, with their content addresses."""

    image: bytes
    image_name: str
    thumbnail: bytes
    thumbnail_name: str
    width: int
    height: int
    box: Box | None  # as drawn, in this image's pixels


@dataclass(frozen=True)
class Rendered:
    """A job's evidence images and how they were fitted into the budget."""

    images: list[Encoded]
    quality: int
    scale: float
    total_bytes: int
    over_budget: bool


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def annotate(raw: bytes, mark: Mark, scale: float = 1.0) -> Image.Image:
    """The screenshot (at `scale`) with the element's box and label drawn, and a failure framed
    in red. Drawn after scaling, so lines and labels keep their size at every rung of the
    ladder: drawn first and scaled with the page, a label was ~7 px high at the last rung."""
    image = _scaled(_decoded(raw), scale)
    draw = ImageDraw.Draw(image)
    box = _scaled_box(mark.box, scale)
    if box is not None:
        b = box
        # Drawn just outside the element, so the element itself stays readable.
        left, top = b.x - BOX_WIDTH, b.y - BOX_WIDTH
        right, bottom = b.x + b.width + BOX_WIDTH - 1, b.y + b.height + BOX_WIDTH - 1
        draw.rectangle((left, top, right, bottom), outline=BOX_COLOR, width=BOX_WIDTH)
        if mark.label:
            _tag(draw, mark.label, left, top, BOX_COLOR, image.width)
    if mark.failure is not None:
        w, h = image.size
        draw.rectangle((0, 0, w - 1, h - 1), outline=FAIL_COLOR, width=FRAME_WIDTH)
        # Bottom left: the top of a failed page is where its header and error banner are.
        _tag(draw, f"FAILED: {mark.failure}", FRAME_WIDTH, h - FRAME_WIDTH, FAIL_COLOR, w)
    return image


def _decoded(raw: bytes) -> Image.Image:
    """`raw` decoded as RGB, to draw on. A capture is RGB already: drawing on the decoded image
    itself spares a copy, which costs ~5 ms for 1280x800 — more than the decoding, since every
    new image's memory is fresh from the kernel (Pillow keeps no freed blocks by default)."""
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _tag(
    draw: ImageDraw.ImageDraw,
    text: str,
    x: float,
    y: float,
    color: tuple[int, int, int],
    limit: int,
) -> None:
    """A filled label above (x, y); below it when there is no room above."""
    font = _font(14)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 12, bottom - top + 8
    x = max(0.0, min(x, limit - width))
    y = y - height if y - height >= 0 else y
    draw.rectangle((x, y, x + width, y + height), fill=color)
    draw.text((x + 6, y + 4 - top), text, fill=(255, 255, 255), font=font)


def _encode(image: Image.Image, fmt: ImageFormat, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "webp":
        image.save(out, "WEBP", quality=quality, method=4)
    else:
        image.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    if scale == 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def content_name(data: bytes, fmt: ImageFormat) -> str:
    """The content address of an image: its SHA-256, with the format's extension."""
    return f"{hashlib.sha256(data).hexdigest()}.{'webp' if fmt == 'webp' else 'jpg'}"


def prepare(raw: bytes, mark: Mark, fmt: ImageFormat = "webp") -> Encoded:
    """One screenshot annotated and encoded at the ladder's first rung, with its thumbnail.

    Called as each step's capture lands, so that by the time the job ends its evidence is
    mostly encoded already (see `render`'s `prepared`)."""
    if fmt == "jpeg" and mark.box is None and mark.failure is None and raw[:3] == _JPEG_START:
        return _as_captured(raw)
    image = annotate(raw, mark)
    thumb, thumb_name = _thumbnail(image, fmt)
    quality, scale = LADDER[0]
    return _encoded(image, mark, fmt, quality, scale, thumb, thumb_name)


_JPEG_START = b"\xff\xd8\xff"


def fit_capture(raw: bytes, allowance: int) -> bytes | None:
    """A JPEG capture within `allowance` bytes: as it is when it fits, else encoded again at
    the ladder's lower qualities (never smaller: a step's box is measured on the page at full
    size) until it does. None when even the lowest quality does not fit."""
    if len(raw) <= allowance:
        return raw
    if allowance <= 0:
        return None
    with Image.open(io.BytesIO(raw)) as opened:
        image = opened.convert("RGB")
    for quality in sorted({quality for quality, _ in LADDER[1:]}, reverse=True):
        data = _encode(image, "jpeg", quality)
        if len(data) <= allowance:
            return data
    return None


def _as_captured(raw: bytes) -> Encoded:
    """A capture with nothing to draw on it (a step that navigated away from its element) is
    its own evidence image: the browser already encoded it as JPEG at the first rung's quality
    (`worker.evidence.JPEG_QUALITY`). Decoding and encoding it again would cost ~6 ms of CPU,
    half of it holding the GIL (Pillow's JPEG encoder keeps it for the whole image, stalling
    the event loop every job shares). The thumbnail is decoded at a quarter of the size by the
    JPEG decoder itself."""
    with Image.open(io.BytesIO(raw)) as opened:
        width, height = opened.size
        opened.draft("RGB", (THUMB_WIDTH, THUMB_WIDTH * height // max(width, 1)))
        small = opened.convert("RGB")
    thumb, thumb_name = _thumbnail(small, "jpeg")
    return Encoded(raw, content_name(raw, "jpeg"), thumb, thumb_name, width, height, None)


def _thumbnail(image: Image.Image, fmt: ImageFormat) -> tuple[bytes, str]:
    # Averaging whole pixel blocks first is 5x cheaper than resampling the full image and looks
    # the same at thumbnail size; only the small remainder (if any) is resampled.
    factor = image.width // THUMB_WIDTH
    small = image.reduce(factor) if factor > 1 else image.copy()
    small.thumbnail((THUMB_WIDTH, THUMB_WIDTH * 4), Image.Resampling.LANCZOS)
    data = _encode(small, fmt, THUMB_QUALITY)
    return data, content_name(data, fmt)


def _scaled_box(box: Box | None, scale: float) -> Box | None:
    if box is None or scale == 1.0:
        return box
    return Box(x=box.x * scale, y=box.y * scale, width=box.width * scale, height=box.height * scale)


def _encoded(
    image: Image.Image,
    mark: Mark,
    fmt: ImageFormat,
    quality: int,
    scale: float,
    thumb: bytes,
    thumb_name: str,
) -> Encoded:
    """`image`, annotated at `scale` already (`annotate`), encoded at `quality`."""
    data = _encode(image, fmt, quality)
    box = _scaled_box(mark.box, scale)
    return Encoded(data, content_name(data, fmt), thumb, thumb_name, image.width, image.height, box)


def _stored_bytes(images: list[Encoded]) -> int:
    """What `images` take once stored: identical images and thumbnails count once."""
    unique = {e.image_name: len(e.image) for e in images}
    unique.update({e.thumbnail_name: len(e.thumbnail) for e in images})
    return sum(unique.values())


def render(
    shots: list[tuple[bytes, Mark]],
    *,
    fmt: ImageFormat = "webp",
    budget_bytes: int,
    prepared: list[Encoded | None] | None = None,
) -> Rendered:
    """Annotate every screenshot and encode all of them within `budget_bytes` in all.

    `prepared[i]`, when given, is `prepare(*shots[i], fmt)` done earlier: within the budget at
    the first rung (the usual case), nothing is encoded again. Identical images (a page that did
    not change) are counted once, as they are stored once. When even the last step of the
    ladder is over budget the images are kept anyway, marked `over_budget`: evidence is worth
    more than the budget.
    """
    ready = prepared if prepared is not None else [None] * len(shots)
    first = [
        done if done is not None else prepare(raw, mark, fmt)
        for (raw, mark), done in zip(shots, ready, strict=True)
    ]
    total = _stored_bytes(first)
    quality, scale = LADDER[0]
    if total <= budget_bytes:
        return Rendered(first, quality, scale, total, False)
    drawn: dict[float, list[Image.Image]] = {}  # per scale, drawn when a rung first needs it
    for rung, (quality, scale) in enumerate(LADDER[1:], start=1):
        last = rung == len(LADDER) - 1
        images: list[Encoded] = []
        if scale not in drawn:
            drawn[scale] = [annotate(raw, mark, scale) for raw, mark in shots]
        for image, (_, mark), enc in zip(drawn[scale], shots, first, strict=True):
            thumb, thumb_name = enc.thumbnail, enc.thumbnail_name
            images.append(_encoded(image, mark, fmt, quality, scale, thumb, thumb_name))
            if not last and _stored_bytes(images) > budget_bytes:
                break  # this rung is already over: on to the next
        total = _stored_bytes(images)
        if len(images) == len(shots) and (last or total <= budget_bytes):
            return Rendered(images, quality, scale, total, total > budget_bytes)
    raise AssertionError("the last rung always returns")
