// Stepline dashboard: confirmations before actions, and the live refresh of a page's #live part.
// Plain JavaScript, no library; every page also works without it (the actions then skip the
// confirmation, the page does not refresh by itself).
"use strict";

document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

(function liveRefresh() {
  const live = document.getElementById("live");
  if (!live || !live.dataset.live) return;
  const seconds = Math.max(2, parseInt(live.dataset.live, 10) || 5);
  let busy = false;
  async function refresh() {
    // Not while the tab is hidden, the operator types in a form of the live part, or reads
    // a value they unfolded: a refresh would take it away from under them.
    const focused = document.activeElement;
    const typing = focused && live.contains(focused) && ["INPUT", "TEXTAREA", "SELECT"].includes(focused.tagName);
    if (busy || document.hidden || typing || live.querySelector("details[open]")) return;
    busy = true;
    try {
      const response = await fetch(window.location.href, { headers: { "X-Requested-With": "refresh" }, credentials: "same-origin" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("live");
      if (fresh) {
        live.replaceChildren(...fresh.childNodes);
        if (!fresh.dataset.live) delete live.dataset.live;
      }
    } catch (error) {
      // The server is restarting or the network is down: try again at the next tick.
    } finally {
      busy = false;
    }
  }
  window.setInterval(() => { if (live.dataset.live) refresh(); }, seconds * 1000);
})();
