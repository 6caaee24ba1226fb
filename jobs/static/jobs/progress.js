// Sweep progress in the admin: polls the sweep's JSON status until every image is final.
"use strict";
(function () {
  const root = document.querySelector("[data-status-url]");
  if (!root) return;
  const url = root.dataset.statusUrl;
  const state = document.getElementById("sweep-state");
  const bar = document.getElementById("sweep-bar");
  const counts = document.getElementById("sweep-counts");
  const body = document.querySelector("#sweep-images tbody");
  const links = document.getElementById("sweep-links");

  function cell(row, content) {
    const td = row.insertCell();
    if (content instanceof Node) td.appendChild(content); else td.textContent = content ?? "";
    return td;
  }

  function link(href, text) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    return a;
  }

  function render(sweep) {
    if (!sweep.id) {
      state.textContent = "Waiting for a worker to start the sweep…";
      return;
    }
    bar.style.width = sweep.progress + "%";
    const c = sweep.counts;
    if (sweep.status === "failed") {
      state.textContent = "Sweep failed: " + sweep.error;
      state.classList.add("parroter-bad");
    } else if (sweep.status === "held") {
      state.textContent = "Held back: " + sweep.error;
      state.classList.add("parroter-bad");
    } else if (sweep.status === "skipped") {
      state.textContent = "Skipped: another sweep of this folder was running. Try again shortly.";
    } else if (sweep.over && sweep.total === 0) {
      state.textContent = sweep.unstable
        ? `Nothing taken yet: ${sweep.unstable} file(s) still changing. Sweep again in a moment.`
        : "Done: nothing new in the folder.";
    } else if (sweep.over) {
      state.textContent = `Done: ${sweep.total} image(s) — ${c.done} done, ${c.duplicate} duplicate, ${c.failed} failed.`;
    } else if (sweep.status === "running") {
      state.textContent = "Sweeping the folder…";
    } else {
      state.textContent = `Processing: ${sweep.finished} of ${sweep.total} finished (${sweep.progress}%).`;
    }
    counts.textContent = `Folder ${sweep.folder}: ${sweep.seen} seen, ${sweep.claimed} claimed, ` +
      `${sweep.unstable} still changing, ${sweep.ignored} ignored, ${sweep.requeued} retried; sizes ${sweep.sizes.join(", ")}.`;
    body.replaceChildren();
    for (const image of sweep.images) {
      const row = body.insertRow();
      row.dataset.status = image.status;
      if (image.preview_url) {
        const img = document.createElement("img");
        img.src = image.preview_url;
        img.alt = "";
        cell(row, img);
      } else cell(row, "");
      cell(row, link(image.admin_url, image.name));
      cell(row, image.status_label);
      cell(row, image.thumbnails.map((t) => `${t.width}×${t.height}`).join(", "));
      cell(row, image.archive_url ? link(image.archive_url, "download") : "—");
      cell(row, image.error);
    }
    links.replaceChildren(link(sweep.admin_url, "The sweep's record"), document.createTextNode(" · "),
      link(sweep.images_admin_url, "its images in the list"));
  }

  async function poll() {
    let over = false;
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (response.ok) {
        const sweep = await response.json();
        render(sweep);
        over = sweep.over;
      } else {
        state.textContent = `Status unavailable (HTTP ${response.status}); retrying…`;
      }
    } catch (error) {
      state.textContent = "Status unavailable (" + error + "); retrying…";
    }
    if (!over) setTimeout(poll, 1000);
    else root.dataset.over = "true";
  }
  poll();
})();
