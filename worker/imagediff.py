"""Screenshot comparison for replay: the share of pixels that changed, and a picture of where.

Both images have the regions the script declares dynamic (dates, generated numbers) blacked
out first, from the boxes recorded at capture time on either side. A pixel counts as changed
when one of its channels moved by more than `TOLERANCE` — JPEG re-encoding noise moves a few
levels; a changed word or colour moves far more. Runs in a thread: Pillow work is CPU-bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, UnidentifiedImageError

from worker.contract import Box

TOLERANCE = 48
_CHANGED = (230, 20, 60)


@dataclass(frozen=True)
class ImageDiff:
    ratio: float  # changed pixels / all pixels, after masking; 1.0 when the sizes differ
    size_changed: bool
    diff: Path | None  # an image of the changes over a faded copy of the actual screenshot
    # An image Pillow could not read (which one, and why): then nothing was compared.
    unreadable: Path | None = None
    reason: str | None = None


def compare(expected: Path, actual: Path, masks: list[Box], diff_out: Path | None) -> ImageDiff:
    before, after = _rgb(expected), _rgb(actual)
    if isinstance(before, str):
        return ImageDiff(
            ratio=1.0, size_changed=False, diff=None, unreadable=expected, reason=before
        )
    if isinstance(after, str):
        return ImageDiff(ratio=1.0, size_changed=False, diff=None, unreadable=actual, reason=after)
    if before.size != after.size:
        return ImageDiff(ratio=1.0, size_changed=True, diff=None)
    for image in (before, after):
        draw = ImageDraw.Draw(image)
        for box in masks:
            draw.rectangle((box.x, box.y, box.x + box.width, box.y + box.height), fill=(0, 0, 0))
    # The largest channel difference per pixel, thresholded to a 0/255 mask.
    delta = ImageChops.difference(before, after)
    channels = delta.split()
    largest = ImageChops.lighter(ImageChops.lighter(channels[0], channels[1]), channels[2])
    changed = largest.point(lambda level: 255 if level > TOLERANCE else 0)
    count = changed.histogram()[255]
    ratio = count / (after.width * after.height)
    path = None
    if diff_out is not None:
        faded = Image.blend(
            after.convert("L").convert("RGB"), Image.new("RGB", after.size, "white"), 0.6
        )
        faded.paste(Image.new("RGB", after.size, _CHANGED), mask=changed)
        draw = ImageDraw.Draw(faded)
        for box in masks:
            draw.rectangle(
                (box.x, box.y, box.x + box.width, box.y + box.height), outline=(40, 90, 200)
            )
        faded.save(diff_out)
        path = diff_out
    return ImageDiff(ratio=ratio, size_changed=False, diff=path)


def _rgb(path: Path) -> Image.Image | str:
    """The image at `path` in RGB, or why it cannot be read: not an image, or a truncated
    one. A damaged golden is a finding of the replay, not a crash of it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return _reason(exc)


def _reason(exc: Exception) -> str:
    # Pillow's "cannot identify image file '<full path>'": the caller names the file already.
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    return str(exc) or type(exc).__name__
