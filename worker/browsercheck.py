"""What only a browser can check before a job runs: that a registry's CSS selectors and a
script's `redact:` selectors parse, and that a script's `press` keys are keys.

Loading a script or a registry checks everything Python can. A selector's syntax is the
browser's to judge (Playwright's selector engine for candidates, the page's own
`querySelectorAll` for failure detectors and redacted regions), and the key names a `press`
may use are Playwright's keyboard layout. Without this, `#credit[[` or `Entr` would pass
`formwork validate` and stop the first job that reached them (or, in `redact:`, quietly leave
the region unblurred). `formwork validate` runs these checks in one Chromium, on
about:blank: no site is contacted and nothing is typed anywhere that matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, async_playwright

from worker.browser import CHROMIUM_ARGS
from worker.selectors import SiteRegistry
from worker.yamlfile import describe_loc, line_of, read_yaml

Kind = Literal["locator", "css", "key"]


@dataclass(frozen=True)
class Probe:
    """One value to try in the browser, and where it was written."""

    path: Path
    loc: tuple[int | str, ...]
    # locator: a candidate (Playwright's engine); css: a detector or a redacted region (the
    # page's querySelectorAll); key: a key name
    kind: Kind
    value: str


def registry_probes(path: Path, registry: SiteRegistry) -> list[Probe]:
    """Every CSS selector of `registry` (loaded from `path`) that is not a template."""
    probes: list[Probe] = []
    for element, candidates in registry.elements.items():
        for index, candidate in enumerate(candidates):
            for field in ("css", "frame"):
                value = getattr(candidate, field)
                if isinstance(value, str) and "{{" not in value:
                    probes.append(
                        Probe(path, ("elements", element, index, field), "locator", value)
                    )
    for kind in ("validation_error", "login_page", "error_banner"):
        for index, selector in enumerate(getattr(registry.detectors, kind)):
            probes.append(Probe(path, ("detectors", kind, index), "css", selector))
    return probes


def script_probes(path: Path) -> list[Probe]:
    """The key of every `press` step in the script at `path`, wherever the step is (its
    steps, alternates, probe), when it is not a template; and its `redact:` selectors."""
    data, _ = read_yaml(path)
    probes = [Probe(path, loc, "key", key) for loc, key in _press_keys(data, ()) if "{{" not in key]
    redact = data.get("redact") if isinstance(data, dict) else None
    for index, selector in enumerate(redact if isinstance(redact, list) else []):
        # Applied with the page's own querySelector (worker.evidence.redact_script), which
        # skips one it cannot parse: a typo would turn the blur off without a word.
        if isinstance(selector, str):
            probes.append(Probe(path, ("redact", index), "css", selector))
    return probes


def _press_keys(
    data: Any, loc: tuple[int | str, ...]
) -> Iterator[tuple[tuple[int | str, ...], str]]:
    if isinstance(data, dict):
        press = data.get("press")
        if isinstance(press, dict) and isinstance(press.get("key"), str):
            yield (*loc, "press", "key"), press["key"]
        for key, value in data.items():
            if isinstance(key, str | int):
                yield from _press_keys(value, (*loc, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _press_keys(value, (*loc, index))


async def check(probes: list[Probe], executable: str | None) -> dict[Path, list[str]]:
    """Each file's problems, one line each (`file:line: where: why`); files without any are
    left out."""
    problems: dict[Path, list[str]] = {}
    if not probes:
        return problems
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            for probe in probes:
                why = await _try(page, probe)
                if why is not None:
                    problems.setdefault(probe.path, []).append(_place(probe) + why)
        finally:
            await browser.close()
    return problems


async def _try(page: Page, probe: Probe) -> str | None:
    """Why `probe` would fail at run time, or None."""
    try:
        if probe.kind == "locator":
            await page.locator(probe.value).count()
        elif probe.kind == "css":
            # Detectors run as the page's own querySelectorAll (worker.failures).
            valid = await page.evaluate(
                "(s) => { try { document.querySelectorAll(s); return true; } "
                "catch (e) { return false; } }",
                probe.value,
            )
            if not valid:
                return f"{probe.value!r} is not valid CSS"
        else:
            await page.keyboard.press(probe.value)
    except PlaywrightError as exc:
        # "Locator.count: Unexpected token …": the API call is ours, not the author's.
        first = exc.message.split("\n")[0].strip().removeprefix("Locator.count: ")
        if probe.kind == "key":
            return (
                f"{probe.value!r} is not a key Playwright knows "
                "(key names are like Enter, Tab, ArrowDown, a, Control+A)"
            )
        return f"{probe.value!r} is not a valid selector: {first}"
    return None


def _place(probe: Probe) -> str:
    data, node = read_yaml(probe.path)
    line = line_of(node, probe.loc)
    return f"{probe.path}{f':{line}' if line else ''}: {describe_loc(data, probe.loc)}: "
