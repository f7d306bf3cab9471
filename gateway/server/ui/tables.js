// The queue, the recent selections, the activity table and the live log.

import { cell, clockTime, element, gatewayNow, seconds, trim } from "./dom.js";

const ACTIVITY_KEPT = 300;
const SELECTIONS_KEPT = 60;
const LOG_KEPT = 500;

export class Activity {
  constructor(table) {
    this.body = table.tBodies[0];
  }

  reset(records) {
    this.body.replaceChildren();
    for (const record of records) this.add(record);
  }

  // A finished request, newest first; one that waited for its engine to start is marked.
  add(r) {
    const row = this.body.insertRow(0);
    row.dataset.model = r.model;
    row.dataset.requestId = r.request_id;
    if (r.waited_for_start) {
      row.classList.add("waited");
      row.title = "waited for its engine to start";
    }
    const time = cell(row, clockTime(r.at));
    if (r.waited_for_start) time.append(" ", element("span", "mark", "waited"));
    cell(row, r.model);
    cell(row, r.alias);
    cell(row, r.endpoint.replace(/^\/v1\//, "") + (r.stream ? " (stream)" : ""));
    cell(row, r.status, r.status < 400 ? "ok" : "failed");
    cell(row, r.prompt_tokens, "number");
    cell(row, r.counted);
    cell(row, r.completion_tokens, "number");
    cell(row, r.context, "number");
    cell(row, seconds(r.ttft), "number");
    cell(row, r.tokens_per_second, "number");
    cell(row, seconds(r.duration), "number");
    cell(row, r.requeues, "number");
    trim(this.body, ACTIVITY_KEPT);
  }
}

export class Selections {
  constructor(table) {
    this.body = table.tBodies[0];
  }

  reset(selections, evictions) {
    this.body.replaceChildren();
    const merged = [
      ...selections.map((s) => [s.at, () => this.add(s)]),
      ...evictions.map((e) => [e.at, () => this.addEviction(e)]),
    ];
    for (const [, add] of merged.sort((a, b) => a[0] - b[0])) add();
  }

  // Needed tokens (the prompt, as counted, and the answer's reserve) against the variant chosen.
  add(s) {
    const row = this.body.insertRow(0);
    row.className = `outcome-${s.outcome}`;
    cell(row, clockTime(s.at));
    cell(row, s.model);
    cell(row, `${s.prompt_tokens + s.reserve} (${s.prompt_tokens} ${s.method} + ${s.reserve})`, "number");
    cell(row, s.context === null ? "none fits" : `context ${s.context}`);
    cell(row, s.outcome);
    trim(this.body, SELECTIONS_KEPT);
  }

  addEviction(e) {
    const row = this.body.insertRow(0);
    row.className = "eviction";
    cell(row, clockTime(e.at));
    cell(row, e.model);
    cell(row, null);
    cell(row, null);
    cell(row, `evicted${e.busy ? " (busy)" : ""} for ${e.for}`);
    trim(this.body, SELECTIONS_KEPT);
  }
}

export class Queue {
  constructor(table, empty) {
    this.body = table.tBodies[0];
    this.empty = empty;
    this.models = {};
  }

  set(models) {
    this.models = models;
    this.tick();
  }

  tick() {
    const rows = Object.entries(this.models).map(([model, waiting]) => {
      const row = document.createElement("tr");
      row.dataset.model = model;
      cell(row, model);
      cell(row, waiting.count, "number");
      cell(row, seconds(Math.max(0, gatewayNow() - waiting.oldest)), "number");
      return row;
    });
    this.body.replaceChildren(...rows);
    this.empty.hidden = rows.length > 0;
  }
}

export class Log {
  constructor(list, source, filter) {
    this.list = list;
    this.source = source;
    this.filter = filter;
    // Whether the view follows the newest line, kept as the reader scrolls: measuring it
    // for every line forced a layout per line (seconds a minute on a busy gateway).
    this.following = true;
    this.scrolling = false; // a scroll to the end is due at the next frame
    list.addEventListener("scroll", () => {
      this.following = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
    });
    for (const control of [source, filter]) control.addEventListener("input", () => this.refilter());
  }

  reset(lines) {
    this.list.replaceChildren();
    for (const line of lines) this.add(line);
  }

  add(line) {
    const item = element("li", `${line.source} level-${line.level}`);
    item.append(
      element("time", null, clockTime(line.time ?? line.at)),
      element("span", "origin", line.engine ?? "gateway"),
      element("span", "level", line.level),
      element("span", "message", line.message),
    );
    item.hidden = !this.shows(item);
    this.list.append(item);
    while (this.list.children.length > LOG_KEPT) this.list.firstElementChild.remove();
    if (this.following && !this.scrolling) {
      this.scrolling = true;
      requestAnimationFrame(() => {
        this.scrolling = false;
        this.list.scrollTop = this.list.scrollHeight;
      });
    }
  }

  shows(item) {
    const source = this.source.value;
    const text = this.filter.value.toLowerCase();
    return (!source || item.classList.contains(source)) && item.textContent.toLowerCase().includes(text);
  }

  refilter() {
    for (const item of this.list.children) item.hidden = !this.shows(item);
  }
}
