// Keyboard review of a job: j/k or arrows move between steps, and Tab reaches each one; Enter
// enlarges the step's screenshot, Esc closes it. Keys stay the focused element's own where it
// uses them (typing in a field, Enter on a link or button), and so do modified keys.
(() => {
  // The job list: a thumbnail whose image was deleted from the store says so, instead of a
  // broken-image icon (lazy images that have not loaded yet are not complete, and not broken).
  const missing = (img) => {
    const cell = img.closest("td.thumb");
    if (cell) cell.replaceChildren(Object.assign(document.createElement("span"), {
      className: "missing bad-text", textContent: "image missing",
    }));
  };
  document.querySelectorAll("td.thumb img").forEach((img) => {
    if (img.complete && img.naturalWidth === 0) missing(img);
    else img.addEventListener("error", () => missing(img));
  });

  const steps = Array.from(document.querySelectorAll("#steps .step"));
  const details = Array.from(document.querySelectorAll(".detail"));
  const box = document.getElementById("lightbox");
  if (!steps.length) return;
  let current = 0;

  const show = (index) => {
    current = Math.max(0, Math.min(steps.length - 1, index));
    steps.forEach((s, i) => {
      s.classList.toggle("current", i === current);
      s.setAttribute("aria-current", i === current ? "step" : "false");
    });
    details.forEach((d, i) => { d.hidden = i !== current; });
    // Keep the current step in view inside the timeline only: the page itself stays put.
    const nav = steps[current].closest(".timeline");
    const el = steps[current];
    if (nav && el.offsetTop < nav.scrollTop) nav.scrollTop = el.offsetTop;
    else if (nav && el.offsetTop + el.offsetHeight > nav.scrollTop + nav.clientHeight) {
      nav.scrollTop = el.offsetTop + el.offsetHeight - nav.clientHeight;
    }
    history.replaceState(null, "", "#step-" + current);
    // On the timeline, the focus follows the step shown: Tab goes on from there.
    if (steps.includes(document.activeElement) && document.activeElement !== el) {
      el.focus({ preventScroll: true });
    }
  };
  const enlarge = () => {
    const img = details[current].querySelector("img.shot");
    if (!img || !box) return;
    box.querySelector("img").src = img.src;
    box.hidden = false;
  };
  const close = () => { if (box) box.hidden = true; };

  steps.forEach((s, i) => {
    s.addEventListener("click", () => show(i));
    s.addEventListener("focus", () => show(i));
  });
  details.forEach((d) => d.querySelector("img.shot")?.addEventListener("click", enlarge));
  // The screenshots of a request or a dry run, outside the timeline, and each attempt's,
  // enlarge on a click too.
  const enlargeSrc = (src) => {
    if (!box) return;
    box.querySelector("img").src = src;
    box.hidden = false;
  };
  document.querySelectorAll(".card img.shot").forEach((img) => img.addEventListener("click", () => enlargeSrc(img.src)));
  document.querySelectorAll("button.attempt-shot").forEach((b) => b.addEventListener("click", () => enlargeSrc(b.dataset.src)));
  box?.addEventListener("click", close);
  document.querySelectorAll("[data-goto]").forEach((a) => a.addEventListener("click", (e) => {
    e.preventDefault();
    const i = steps.findIndex((s) => s.dataset.step === a.dataset.goto);
    if (i >= 0) show(i);
  }));
  const typing = (el) =>
    el instanceof Element && (el.closest("input, textarea, select") !== null || el.isContentEditable);
  const activates = (el) =>
    el instanceof Element &&
    el.closest("a[href], button, summary, [role=button], [role=link]") !== null;
  document.addEventListener("keydown", (e) => {
    if (e.defaultPrevented || e.metaKey || e.ctrlKey || e.altKey || e.shiftKey) return;
    if (e.isComposing || typing(e.target)) return;
    const open = box && !box.hidden;
    if (e.key === "Escape") { close(); return; }
    if (e.key === "j" || e.key === "ArrowDown" || e.key === "ArrowRight") { close(); show(current + 1); }
    else if (e.key === "k" || e.key === "ArrowUp" || e.key === "ArrowLeft") { close(); show(current - 1); }
    else if (e.key === "Enter" && !open && !activates(e.target)) enlarge();
    else return;
    e.preventDefault();
  });

  // Open where the link pointed (#step-N), else at the failed step, else the first.
  const fromHash = /^#step-(\d+)$/.exec(location.hash);
  const failed = steps.findIndex((s) => s.classList.contains("bad"));
  show(fromHash ? Number(fromHash[1]) : Math.max(failed, 0));
})();
