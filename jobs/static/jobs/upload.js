// The upload page: send the files with progress, then follow each image to its zip.
"use strict";
(function () {
  const form = document.getElementById("upload-form");
  const input = document.getElementById("id_images");
  const dropZone = document.getElementById("drop-zone");
  const dropText = document.getElementById("drop-text");
  const button = document.getElementById("upload-button");
  const errors = document.getElementById("form-errors");
  const progress = document.getElementById("upload-progress");
  const uploadState = document.getElementById("upload-state");
  const uploadBar = document.getElementById("upload-bar");
  const jobs = document.getElementById("jobs");
  const POLL_MS = 1000;
  // 401: signed out meanwhile (logged out in another tab, the session expired); 403: the
  // page's CSRF token is stale (signed in again elsewhere). Either way only a reload helps.
  const SESSION_ENDED = "Your session has ended or this page is out of date: reload the page " +
    "and sign in again.";

  function element(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (key === "class") node.className = value; else node.setAttribute(key, value);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  // Sizes as the server's pages write them (Django's filesizeformat): 1 KB = 1,024 bytes,
  // a no-break space before the unit.
  function fileSize(bytes) {
    if (bytes < 1024) return `${bytes}\u00a0byte${bytes === 1 ? "" : "s"}`;
    const units = ["KB", "MB", "GB", "TB", "PB"];
    let value = bytes / 1024;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return `${value.toFixed(1)}\u00a0${units[unit]}`;
  }

  function showFiles() {
    const count = input.files.length;
    dropText.textContent = count ? `${count} file${count > 1 ? "s" : ""} chosen: ` +
      Array.from(input.files).map((f) => f.name).join(", ") : "Choose images or drop them here";
  }

  input.addEventListener("change", showFiles);
  for (const name of ["dragenter", "dragover"]) {
    dropZone.addEventListener(name, (event) => { event.preventDefault(); dropZone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    dropZone.addEventListener(name, () => dropZone.classList.remove("over"));
  }
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    input.files = event.dataTransfer.files;
    showFiles();
  });

  function showErrors(messages) {
    errors.textContent = messages.join("\n");
    errors.hidden = messages.length === 0;
  }

  function errorMessages(body) {
    const messages = [];
    for (const [field, list] of Object.entries(body.errors || {})) {
      for (const item of list) messages.push((field === "__all__" ? "" : field + ": ") + item.message);
    }
    for (const item of body.rejected || []) messages.push(`${item.name}: ${item.error}`);
    return messages;
  }

  function jobCard(image) {
    const card = element("article", { class: "job", "data-image": image.id });
    update(card, image);
    return card;
  }

  function rejectedCard(item) {
    return element("article", { class: "job", "data-status": "rejected" },
      element("header", {}, element("span", { class: "name" }, item.name),
        element("span", { class: "pill rejected" }, "not taken")),
      element("div", { class: "job-error" }, item.error));
  }

  function update(card, image) {
    card.dataset.status = image.status;
    const bar = element("div", { class: "bar" }, element("div"));
    const fill = bar.firstChild;
    let label = image.status_label;
    if (image.status === "pending") { label = "queued"; fill.style.width = "3%"; }
    else if (image.status === "processing") { bar.classList.add("indeterminate"); }
    else { fill.style.width = "100%"; if (image.status !== "failed") bar.classList.add("done"); }
    const parts = [];
    if (image.width) parts.push(`${image.width}×${image.height} ${image.format}`);
    if (image.archive_size) parts.push(`zip ${fileSize(image.archive_size)}`);
    if (image.seconds != null) parts.push(`${image.seconds.toFixed(2)} s`);
    if (image.is_duplicate) parts.push("same image and sizes as an earlier upload: its zip is reused");
    const thumbs = element("div", { class: "thumbs" });
    for (const thumb of image.thumbnails) {
      thumbs.append(element("figure", {},
        element("img", { src: thumb.url, width: thumb.width, height: thumb.height, alt: thumb.size }),
        element("figcaption", {}, `${thumb.width}×${thumb.height}`)));
    }
    const children = [
      element("header", {}, element("span", { class: "name" }, image.name),
        element("span", { class: "pill " + image.status }, label)),
      bar,
      parts.length ? element("div", { class: "detail" }, parts.join(" · ")) : null,
      image.error ? element("div", { class: "job-error" }, image.error) : null,
      image.archive_url ? element("a", { class: "download", href: image.archive_url }, "Download zip") : null,
      image.thumbnails.length ? thumbs : null,
    ];
    card.replaceChildren(...children.filter(Boolean));
  }

  async function follow(statusUrl, cards) {
    try {
      const response = await fetch(statusUrl, { headers: { Accept: "application/json" } });
      if (response.ok) {
        const sweep = await response.json();
        for (const image of sweep.images) {
          const card = cards.get(image.id);
          const key = image.status + " " + (image.archive_url || "");
          if (card && card.dataset.key !== key) {
            update(card, image);
            card.dataset.key = key;
          }
        }
        uploadState.textContent = sweep.over
          ? `All ${sweep.total} finished: ${sweep.counts.done} done, ${sweep.counts.duplicate} duplicate, ${sweep.counts.failed} failed.`
          : `Processing: ${sweep.finished} of ${sweep.total} finished (${sweep.progress}%).`;
        uploadBar.style.width = sweep.progress + "%";
        if (sweep.over) { button.disabled = false; progress.dataset.over = "true"; return; }
      } else {
        if (response.status === 401 || response.status === 403) {
          uploadState.textContent = SESSION_ENDED;
          button.disabled = false;
          return;
        }
        uploadState.textContent = `Status unavailable (HTTP ${response.status}); retrying…`;
      }
    } catch (error) {
      uploadState.textContent = `Status unavailable (${error}); retrying…`;
    }
    setTimeout(() => follow(statusUrl, cards), POLL_MS);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    showErrors([]);
    if (!input.files.length) { showErrors(["Choose at least one image."]); return; }
    button.disabled = true;
    progress.hidden = false;
    delete progress.dataset.over;
    uploadBar.parentElement.classList.remove("done");
    uploadBar.style.width = "0%";
    uploadState.textContent = "Uploading…";
    const request = new XMLHttpRequest();
    request.open("POST", form.action);
    request.setRequestHeader("X-CSRFToken", form.elements.csrfmiddlewaretoken.value);
    request.responseType = "json";
    request.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      const percent = Math.round((100 * e.loaded) / e.total);
      uploadBar.style.width = percent + "%";
      uploadState.textContent = `Uploading… ${percent}%`;
    });
    request.addEventListener("load", () => {
      const body = request.response || {};
      if (request.status !== 201) {
        progress.hidden = true;
        button.disabled = false;
        const messages = errorMessages(body);
        if (!messages.length && (request.status === 401 || request.status === 403)) {
          messages.push(SESSION_ENDED);
        }
        showErrors(messages.length ? messages : [`Upload failed (HTTP ${request.status}).`]);
        return;
      }
      uploadBar.style.width = "0%";
      uploadBar.parentElement.classList.add("done");
      uploadState.textContent = "Uploaded; queued for processing…";
      const cards = new Map();
      const batch = element("div", { class: "batch" });
      for (const image of body.sweep.images) {
        const card = jobCard(image);
        cards.set(image.id, card);
        batch.append(card);
      }
      for (const item of body.rejected || []) batch.append(rejectedCard(item));
      jobs.prepend(batch);
      input.value = "";  // the sizes stay for the next batch
      showFiles();
      follow(body.status_url, cards);
    });
    request.addEventListener("error", () => {
      progress.hidden = true;
      button.disabled = false;
      showErrors(["The upload did not reach the server (network error)."]);
    });
    request.send(new FormData(form));
  });
})();
