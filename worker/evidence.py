"""Step screenshots: taken after the page settles, with secret fields masked at capture time.

Masking happens in the page itself, before anything is painted: every context carries a style
(`MASK_SCRIPT`, installed by `worker.browser`) that renders password inputs — and any field a
secret was typed into, marked by `mark_secret` — as a solid box with transparent text. A
secret the site paints by itself (echoed in a message, filled back into a field) is masked the
same way by `echo_mask_script`, installed per job. The browser never paints the secret, so no
captured pixel, in memory or on disk, can hold it.

Capture goes straight to Chromium's DevTools `Page.captureScreenshot` (JPEG, optimised for
speed): a step's evidence costs one round trip instead of Playwright's screenshot machinery
(mask overlays, animation and caret handling), which costs several — see bench/overhead.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Iterable

from playwright.async_api import CDPSession, FloatRect, Locator, Page
from playwright.async_api import Error as PlaywrightError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from worker.annotate import LADDER
from worker.contract import Box, FailureCode
from worker.errors import StepError
from worker.secretstore import text_forms

IMAGE_SUFFIX = ".jpg"
# The evidence ladder's first rung: a capture with nothing to draw on it is kept as it is.
JPEG_QUALITY = LADDER[0][0]
MASK_COLOR = "#1f1f1f"
SETTLE_TIMEOUT_MS = 5_000
# A capture takes ~25-50 ms; Chromium may also never answer one (a page whose load was stopped
# before it painted): past this, the step goes on without its picture rather than hang the job.
CAPTURE_TIMEOUT_S = 10.0
SECRET_ATTRIBUTE = "data-formwork-secret"
_IFRAME_BOX_TIMEOUT_MS = 1_000

_MASK_CSS = (
    f"input[type=password], [{SECRET_ATTRIBUTE}] {{ color: transparent !important; "
    f"-webkit-text-fill-color: transparent !important; text-shadow: none !important; "
    f"caret-color: transparent !important; background: {MASK_COLOR} !important; }}"
)
# Runs in every document of a job's context before the page's own scripts.
MASK_SCRIPT = f"""
(() => {{
  const style = document.createElement("style");
  style.textContent = {_MASK_CSS!r};
  const add = () => (document.head || document.documentElement).appendChild(style);
  if (document.documentElement) add();
  else document.addEventListener("readystatechange", add, {{ once: true }});
}})();
"""

# Inline !important beats any stylesheet, the site's own included.
_MARK_JS = f"""
(els) => {{
  for (const el of els) {{
    el.setAttribute({SECRET_ATTRIBUTE!r}, "");
    for (const [name, value] of [["color", "transparent"], ["-webkit-text-fill-color",
        "transparent"], ["text-shadow", "none"], ["caret-color", "transparent"],
        ["background", {MASK_COLOR!r}]]) {{
      el.style.setProperty(name, value, "important");
    }}
  }}
  return els.length;
}}
"""


# Two 32-bit rolling hashes (bases 31 and 131) of a value's UTF-16 code units, as JavaScript's
# Math.imul computes them: what `echo_mask_script` looks for instead of the value itself.
_HASH_BASES = (31, 131)
# The longest text of an element read whole for a value split across its children: reading an
# element's text costs its length, and every element around a changed node is read. A longer
# one is searched near each node instead (`nearby` in the script).
_ACROSS_LIMIT = 4096


def _rolling_hash(value: str, base: int) -> int:
    units = value.encode("utf-16-le")
    h = 0
    for i in range(0, len(units), 2):
        h = (h * base + int.from_bytes(units[i : i + 2], "little")) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h  # signed, as `| 0` leaves it


def echo_mask_script(values: Iterable[str]) -> str | None:
    """In-page script that masks any element showing one of `values` that nothing typed: a
    sign-in name the site filled back into its form, a password an error message repeats.

    Typed secret fields are masked before typing (`mark_secret`); this covers what the site
    itself paints. A MutationObserver callback runs before the next paint, so, as with the
    mask style, no frame — capture or trace — holds the value. The page gets each value's
    length and two rolling hashes, never the value: a frame of any allowlisted host may run
    this. A text node holding a value masks its element (an error banner becomes one dark
    box); a field holding one is masked like a typed secret field. Shadow roots are watched
    too — closed ones included, since this runs before the page's scripts can attach one — and
    a text node at the top of a shadow root masks its host. A field's `.value` set by a
    script is seen by the setter. A value split across elements masks the smallest element
    whose text holds it, with everything in it, however long that text is (past
    `_ACROSS_LIMIT` characters, the text around each node is read). Any case is seen, and the
    forms the text redactor knows (`text_forms`: composed or decomposed, percent-, JSON- or
    HTML-escaped), since a site may show a value in any of them.
    """
    # Compared in lower case: a site may show a sign-in name in capitals (`FORMWORK-BOT`);
    # the text redactor matches any case too.
    lowered = {form.lower() for v in values for form in text_forms(v)}
    wanted = sorted(
        {
            (len(v.encode("utf-16-le")) // 2, *(_rolling_hash(v, b) for b in _HASH_BASES))
            for v in lowered
        }
    )
    if not wanted:
        return None
    b1, b2 = _HASH_BASES
    return f"""
(() => {{
  const ATTR = {SECRET_ATTRIBUTE!r};
  const power = (b, n) => {{
    let p = 1;
    for (let i = 0; i < n; i++) p = Math.imul(p, b);
    return p;
  }};
  const specs = {json.dumps(wanted)}.map(([n, a, b]) =>
    ({{ n, a, b, p1: power({b1}, n - 1), p2: power({b2}, n - 1) }}));
  // Where in `shown` a value starts and ends ([start, end)), the earliest-ending one first
  // for each length looked for; null when it holds none.
  const find = (shown) => {{
    if (!shown) return null;
    const text = shown.toLowerCase();
    for (const s of specs) {{
      let a = 0, b = 0;
      for (let i = 0; i < text.length; i++) {{
        const c = text.charCodeAt(i);
        if (i >= s.n) {{
          const out = text.charCodeAt(i - s.n);
          a = (a - Math.imul(out, s.p1)) | 0;
          b = (b - Math.imul(out, s.p2)) | 0;
        }}
        a = (Math.imul(a, {b1}) + c) | 0;
        b = (Math.imul(b, {b2}) + c) | 0;
        if (i >= s.n - 1 && a === s.a && b === s.b) return [i + 1 - s.n, i + 1];
      }}
    }}
    return null;
  }};
  const holds = (shown) => find(shown) !== null;
  // The longest value looked for: any value that runs into a text node lies within this many
  // characters either side of it.
  const LONGEST = Math.max(...specs.map((s) => s.n));
  const AHEAD = Math.max(LONGEST, 2048);
  // The element a text node paints in: at the top of a shadow root, the root's host.
  const holder = (node) => node.parentElement || (node.parentNode && node.parentNode.host) || null;
  const mask = (el) => {{
    if (!el || el.hasAttribute(ATTR)) return;
    ({_MARK_JS})([el]);
    const select = el.tagName === "OPTION" ? el.closest("select") : null;
    if (select) ({_MARK_JS})([select]);  // the box shows the chosen option's text
  }};
  const field = (el) => {{
    if ((el.tagName === "INPUT" && el.type !== "password") || el.tagName === "TEXTAREA") {{
      if (holds(el.value) || holds(el.placeholder)) mask(el);
    }}
  }};
  const element = (el) => {{
    field(el);
    const shadow = shadows.get(el) || el.shadowRoot;  // closed roots only from attachShadow
    if (shadow) {{ watch(shadow); tree(shadow); }}
  }};
  // Text nodes of this batch that hold no value by themselves, for `across` to look at once
  // every node has been looked at alone (so a value whole in one node masks that node only).
  const unmatched = [];
  const text = (node) => {{
    if (holds(node.data)) mask(holder(node));
    else if (node.data) unmatched.push(node);
  }};
  // An element and everything in it (a child's own colour would show through the mask).
  const maskAll = (el) => {{
    mask(el);
    for (const inner of el.querySelectorAll("*")) mask(inner);
  }};
  // A value split across the text nodes of an element too long to read whole (a long ticket
  // thread with a search highlight in it): the text around `node` is read instead — the nodes
  // `textContent` would join there, in its order, from LONGEST characters before it to
  // AHEAD after — and the smallest element around each value found in it is masked, unless
  // all of the value is in masked elements already. A node well inside the last window read
  // (LONGEST characters of it either side) is not read again: a page's many nodes cost about
  // one read of its text, not one per node.
  let last = null;
  const nearby = (node) => {{
    const known = last && last.spans.get(node);
    if (known && known[0] >= last.back && last.text.length - known[1] >= LONGEST) return;
    const walk = document.createTreeWalker(node.getRootNode(), NodeFilter.SHOW_TEXT);
    const nodes = [node];
    let back = 0, ahead = 0;
    walk.currentNode = node;
    for (let n = walk.previousNode(); n && back < LONGEST; n = walk.previousNode()) {{
      nodes.unshift(n);
      back += n.data.length;
    }}
    walk.currentNode = node;
    for (let n = walk.nextNode(); n && ahead < AHEAD; n = walk.nextNode()) {{
      nodes.push(n);
      ahead += n.data.length;
    }}
    const spans = new Map();
    let at = 0;
    for (const n of nodes) {{
      spans.set(n, [at, at + n.data.length]);
      at += n.data.length;
    }}
    const text = nodes.map((n) => n.data).join("");
    last = {{ spans, back, text }};
    for (let from = 0, found; (found = find(text.slice(from))); from += found[0] + 1) {{
      const [start, end] = [from + found[0], from + found[1]];
      const range = document.createRange();
      let hidden = true;
      for (const n of nodes) {{
        const [first, next] = spans.get(n);
        if (next > start && first < end) {{
          // Clamped: lower case may be longer than the text (a rare letter), never shorter.
          if (first <= start) range.setStart(n, Math.min(start - first, n.data.length));
          if (next >= end) range.setEnd(n, Math.min(end - first, n.data.length));
          const el = holder(n);
          hidden = hidden && el !== null && el.closest("[" + ATTR + "]") !== null;
        }}
      }}
      if (hidden) continue;
      const common = range.commonAncestorContainer;
      const el = common.nodeType === Node.ELEMENT_NODE ? common : common.host || holder(common);
      if (el) maskAll(el);
    }}
  }};
  // A value split across elements (`pass<b>word</b>`): the smallest element around such a
  // node whose whole text holds it is masked, with everything in it. Elements of up to
  // {_ACROSS_LIMIT} characters of text are read whole, each once a batch (one that holds a
  // masked element already is that element's match); past that, reading costs too much for
  // every node around: the text near the node is read instead (`nearby`).
  const across = () => {{
    // Each element read this batch, and whether the walk up from it ended at a long one:
    // then every node below it has its own nearby text read (a value crossing into it from
    // outside is within LONGEST characters of that node, not of the first node looked at).
    const seen = new Map();
    last = null;  // the page may have changed since the last batch
    for (const node of unmatched.splice(0)) {{
      const path = [];
      let long = false;
      for (let at = node.parentElement; at; at = at.parentElement) {{
        if (seen.has(at)) {{
          long = seen.get(at);
          break;
        }}
        path.push(at);
        if (at.hasAttribute(ATTR)) break;
        const all = at.textContent;
        if (all.length > {_ACROSS_LIMIT}) {{
          long = true;
          break;
        }}
        if (at.querySelector("[" + ATTR + "]")) break;
        if (holds(all)) {{
          maskAll(at);
          break;
        }}
      }}
      for (const at of path) seen.set(at, long);
      if (long) nearby(node);
    }}
  }};
  const tree = (root) => {{
    if (root.nodeType === Node.TEXT_NODE) return text(root);
    if (root.nodeType === Node.ELEMENT_NODE) element(root);
    else if (root.nodeType !== Node.DOCUMENT_FRAGMENT_NODE) return;
    const walk = document.createTreeWalker(root, NodeFilter.SHOW_TEXT | NodeFilter.SHOW_ELEMENT);
    for (let n = walk.nextNode(); n; n = walk.nextNode()) {{
      if (n.nodeType === Node.TEXT_NODE) text(n);
      else element(n);
    }}
  }};
  const observer = new MutationObserver((records) => {{
    for (const r of records) {{
      if (r.type === "characterData") text(r.target);
      else if (r.type === "attributes") field(r.target);
      else for (const n of r.addedNodes) tree(n);
    }}
    across();
  }});
  const onInput = (e) => e.target instanceof Element && field(e.target);
  // An observer of the document does not see into shadow roots, nor does an input listener
  // there hear a field inside one: each root is watched as it is attached (or first found,
  // for one the parser made from a declarative <template>).
  const watched = new WeakSet();
  const watch = (root) => {{
    if (watched.has(root)) return;
    watched.add(root);
    observer.observe(root, {{ subtree: true, childList: true, characterData: true,
                             attributes: true, attributeFilter: ["value", "placeholder"] }});
    root.addEventListener("input", onInput, true);
  }};
  const shadows = new WeakMap();
  const attachShadow = Element.prototype.attachShadow;
  Element.prototype.attachShadow = function (init) {{
    const root = attachShadow.call(this, init);
    shadows.set(this, root);
    watch(root);
    return root;
  }};
  // A script that sets a field's `.value` changes no attribute and sends no event: the
  // setter itself tells. (Playwright's own typing goes through the browser's input, and its
  // scripts run in a world of their own: neither passes here.)
  for (const proto of [HTMLInputElement.prototype, HTMLTextAreaElement.prototype]) {{
    const value = Object.getOwnPropertyDescriptor(proto, "value");
    Object.defineProperty(proto, "value", {{
      ...value,
      set(v) {{
        value.set.call(this, v);
        field(this);
      }},
    }});
  }}
  watch(document);
  if (document.documentElement) tree(document.documentElement);
  across();
}})();
"""


async def mark_secret(field: Locator, timeout_ms: float) -> None:
    """Mask `field` before a secret is typed into it."""
    # One round trip when the field is there (it was just found); otherwise wait for it.
    if not await field.evaluate_all(_MARK_JS):
        await field.evaluate(f"(el) => ({_MARK_JS})([el])", timeout=timeout_ms)


async def capture(page: Page, cdp: CDPSession, *, full_page: bool = False) -> bytes:
    """Screenshot `page` as JPEG (the artifact store keeps it, within the job's budget)."""
    # A screenshot taken while a click's navigation is still committing fails with "Unable to
    # capture screenshot" (or "Not attached to an active page" while Chromium swaps in an error
    # page): wait for the load, and try again a little later if the capture still loses the
    # race — at once, it would lose it again (three tries within 3 ms were seen to).
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(3),
            wait=wait_exponential(multiplier=0.05, max=0.4),
            retry=retry_if_exception_type(PlaywrightError),
            reraise=True,
        ):
            with attempt:
                await _settle(page)
                if full_page:
                    data = await page.screenshot(
                        type="jpeg", quality=JPEG_QUALITY, full_page=True, timeout=SETTLE_TIMEOUT_MS
                    )
                else:
                    async with asyncio.timeout(CAPTURE_TIMEOUT_S):
                        shot = await cdp.send(
                            "Page.captureScreenshot",
                            {"format": "jpeg", "quality": JPEG_QUALITY, "optimizeForSpeed": True},
                        )
                    data = base64.b64decode(shot["data"])
    except PlaywrightError as exc:
        raise StepError(FailureCode.browser_crashed, f"screenshot failed: {exc.message}") from exc
    except TimeoutError as exc:
        raise StepError(
            FailureCode.timeout, f"screenshot failed: no picture within {CAPTURE_TIMEOUT_S:.0f} s"
        ) from exc
    return data


async def _settle(page: Page) -> None:
    # A page that never finishes loading is still worth a picture of what it shows.
    with contextlib.suppress(PlaywrightError):
        await page.wait_for_load_state("load", timeout=SETTLE_TIMEOUT_MS)


# One round trip for everything a screenshot's annotations need: the acted element's box (when
# it is still on the page: a step that navigated has none) and the boxes of the script's
# dynamic regions. Measured in the page rather than with Locator.bounding_box, which waits for
# the element — after a click it may be gone for good. Run in an iframe's element, `document`
# is the iframe's: the regions are then left to a second call in the page (`dynamic: null`),
# and the element's box, which is then in the iframe's own coordinates, is asked of the browser
# in the page's (see `measure`).
_MEASURE_JS = """(els, selectors) => {
  const box = (el) => {
    const r = el.getBoundingClientRect();
    if (r.width <= 0 || r.height <= 0) return null;
    return { x: r.x, y: r.y, width: r.width, height: r.height };
  };
  if (window !== window.top) return { element: els.length ? box(els[0]) : null, dynamic: null };
  const dynamic = [];
  for (const selector of selectors) {
    let nodes;
    try { nodes = document.querySelectorAll(selector); } catch (e) { continue; }
    for (const el of nodes) {
      const b = box(el);
      if (b) dynamic.push(b);
    }
  }
  return { element: els.length ? box(els[0]) : null, dynamic };
}"""


async def measure(
    page: Page, element: Locator | None, selectors: list[str]
) -> tuple[Box | None, list[Box]]:
    """(the box of `element`, the boxes of the elements matching `selectors`), in the viewport
    (what a capture shows); nothing where the page cannot say."""
    if element is None and not selectors:
        return None, []
    in_page = f"(selectors) => ({_MEASURE_JS})([], selectors)"
    try:
        if element is not None:
            found = await element.evaluate_all(_MEASURE_JS, selectors)
        else:
            found = await page.evaluate(in_page, selectors)
        if found["dynamic"] is None:  # the element is in an iframe; the regions are the page's
            found["dynamic"] = (await page.evaluate(in_page, selectors))["dynamic"]
            if found["element"] is not None and element is not None:
                found["element"] = await _page_box(element)
    except PlaywrightError:
        return None, []  # the element's frame went away with the step: nothing to point at
    element_box = found["element"]
    return (
        Box.model_validate(element_box) if element_box else None,
        [Box.model_validate(b) for b in found["dynamic"]],
    )


async def _page_box(element: Locator) -> FloatRect | None:
    """The box of `element` (in an iframe) in the page's viewport, which is what the capture
    shows and what a cross-origin iframe's own script cannot see: the browser knows. The element
    was just measured, so this does not wait long; if it went since, it has no box."""
    try:
        return await element.bounding_box(timeout=_IFRAME_BOX_TIMEOUT_MS)
    except PlaywrightError:
        return None


REDACT_CSS = "filter: blur(14px) !important; user-select: none !important;"


def redact_script(selectors: list[str]) -> str:
    """In-page script that blurs the script's `redact:` regions in every frame painted.

    Like the secret mask, the blur is done by the page's own rendering: screenshots and trace
    frames never hold the sharp pixels, so no later step has to remember to blur them. A
    selector the browser cannot parse is skipped rather than breaking the stylesheet.
    """
    return f"""
(() => {{
  const rules = [];
  for (const sel of {json.dumps(selectors)}) {{
    try {{ document.querySelector(sel); rules.push(sel + " {{ {REDACT_CSS} }}"); }}
    catch (e) {{ /* not a selector: ignored */ }}
  }}
  const style = document.createElement("style");
  style.textContent = rules.join("\\n");
  const add = () => (document.head || document.documentElement).appendChild(style);
  if (document.documentElement) add();
  else document.addEventListener("readystatechange", add, {{ once: true }});
}})();
"""
