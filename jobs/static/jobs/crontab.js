// The chosen crontab in words under the crontab field of the periodic-task form.
// Crontabs that existed when the page loaded come with it; one added through the "+" popup
// afterwards is looked up. With no crontab chosen nothing is shown.
"use strict";
(function () {
  const script = document.currentScript;
  const select = document.getElementById("id_crontab");
  const known = document.getElementById("readable-crontabs");
  if (!select || !known) return;
  const words = JSON.parse(known.textContent);
  // What each choice read when the page loaded: a crontab edited through the pencil popup
  // keeps its id but reads differently, and its words are looked up again.
  const labels = Object.fromEntries(Array.from(select.options, (option) => [option.value, option.text]));
  const line = document.createElement("div");
  line.className = "help parroter-crontab-words";
  line.id = "crontab-words";
  line.setAttribute("aria-live", "polite");
  const row = select.closest(".form-row") || select.parentElement;
  row.querySelector(".help") ? row.querySelector(".help").after(line) : row.append(line);

  function show(text) {
    line.textContent = text ? `In words: ${text}` : "";
    line.hidden = !text;
  }

  async function lookUp(id) {
    const url = script.dataset.wordsUrl.replace(/\/0\/$/, `/${encodeURIComponent(id)}/`);
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (!response.ok) return "";
      const data = await response.json();
      words[id] = data.words;
      return data.words;
    } catch (error) {
      return "";
    }
  }

  async function update() {
    const id = select.value;
    if (!id) return show("");
    const label = select.selectedOptions[0] ? select.selectedOptions[0].text : "";
    if (id in words && labels[id] === label) return show(words[id]);
    labels[id] = label;
    show("");
    const text = await lookUp(id);
    if (select.value === id) show(text);
  }

  // The admin announces a new or changed choice (the "+" and pencil popups) with a jQuery
  // event, which plain listeners never see.
  django.jQuery(select).on("change", update);
  update();
})();
