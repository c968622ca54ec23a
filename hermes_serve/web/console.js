// The console: a playground that keeps the conversation, the key's own standing and usage,
// and, for an admin key, every key's usage: all over the service's public API.
// The key lives in this tab's sessionStorage only, and travels as a header, never a cookie.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "hermes-serve-key";
const DAYS = 14;
let thread = []; // the conversation so far: {role, content}, the system prompt apart
let pending = null; // the last answer, shown in #answer: moved into the thread when the next starts

function key() {
  return sessionStorage.getItem(STORE) || "";
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${key()}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status}`;
    try {
      message = (await response.json()).error.message;
    } catch (_) { /* not our error shape */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

async function connect() {
  const models = await (await api("/v1/models")).json();
  const select = $("model");
  select.replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
  select.disabled = $("send").disabled = models.data.length === 0;
  say(`Connected: ${models.data.length} model(s).`);
  await standing();
}

function cell(row, value) {
  const td = document.createElement("td");
  td.textContent = String(value);
  row.append(td);
}

function day(seconds) {
  return new Date(seconds * 1000).toISOString().slice(0, 10);
}

// The key's own tokens per day and, for an admin key, every key's: OpenAI's usage API.
async function usageCharts(usage) {
  const start = Math.floor(Date.now() / 1000 / 86400 - (DAYS - 1)) * 86400;
  const query = new URLSearchParams({ start_time: String(start), bucket_width: "1d", limit: String(DAYS) });
  query.append("group_by", "api_key_id");
  const page = await (await api(`/v1/organization/usage/completions?${query}`)).json();
  const mine = page.data.map((bucket) => {
    const own = bucket.results.filter((r) => r.api_key_id === usage.key);
    const sum = (field) => own.reduce((total, r) => total + r[field], 0);
    return { label: day(bucket.start_time), values: { input: sum("input_tokens"), output: sum("output_tokens") } };
  });
  window.charts.stackedBars($("usage-chart"), mine, ["input", "output"], ["#3b6fd8", "#e0803a"]);
  const today = usage.usage ? usage.usage.today : null;
  $("usage-note").textContent = today
    ? `Today: ${today.requests} requests, ${today.input_tokens} input (${today.cached_input_tokens} cached) and ${today.output_tokens} output tokens.`
    : "This server records no usage.";
  $("team").hidden = !usage.admin;
  if (!usage.admin) return;
  const keys = [...new Set(page.data.flatMap((b) => b.results.map((r) => r.api_key_id)))].sort();
  const perKey = page.data.map((bucket) => ({
    label: day(bucket.start_time),
    values: Object.fromEntries(bucket.results.map((r) => [r.api_key_id, r.input_tokens + r.output_tokens])),
  }));
  window.charts.stackedBars($("team-chart"), perKey, keys, window.charts.PALETTE);
  $("team-legend").replaceChildren(...keys.map((name, i) => {
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = `swatch c${i % window.charts.PALETTE.length}`;
    item.append(swatch, ` ${name} `);
    return item;
  }));
  const last = page.data[page.data.length - 1];
  const top = (last ? last.results : [])
    .map((r) => ({ key: r.api_key_id, requests: r.num_model_requests, tokens: r.input_tokens + r.output_tokens }))
    .sort((a, b) => b.tokens - a.tokens)
    .slice(0, 10);
  $("top-keys").tBodies[0].replaceChildren(...top.map((t) => {
    const row = document.createElement("tr");
    for (const value of [t.key, t.requests, t.tokens]) cell(row, value);
    return row;
  }));
}

async function standing() {
  const usage = await (await api("/v1/usage")).json();
  $("key-name").textContent = `Key "${usage.key}"` + (usage.expires_at ? `, expires ${usage.expires_at}` : "");
  const rows = Object.entries(usage.limits).map(([name, w]) => {
    const row = document.createElement("tr");
    for (const value of [name, w.used, w.reserved, w.remaining, w.resets_at || "rolling"]) {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      row.append(cell);
    }
    return row;
  });
  if (rows.length === 0) {
    const row = document.createElement("tr");
    const cell = document.createElement("td");
    cell.colSpan = 5;
    cell.textContent = "No limits or budgets on this key.";
    row.append(cell);
    rows.push(row);
  }
  $("standing").tBodies[0].replaceChildren(...rows);
  try {
    await usageCharts(usage);
  } catch (error) {
    $("usage-note").textContent = `Usage: ${error.message}`;
  }
}

function turn(role, content) {
  const node = document.createElement(role === "user" ? "p" : "pre");
  node.className = `turn ${role}`;
  node.textContent = content;
  return node;
}

// Starts a new conversation: what was said is forgotten, here and in the next request.
function newChat() {
  thread = [];
  pending = null;
  $("thread").replaceChildren();
  $("answer").textContent = "";
  $("speed").textContent = "";
}

async function send() {
  const answer = $("answer");
  if (pending !== null) $("thread").append(turn("assistant", pending)); // the last answer joins the thread
  const question = $("prompt").value;
  $("thread").append(turn("user", question));
  answer.textContent = "";
  $("speed").textContent = "";
  $("send").disabled = true;
  const body = {
    model: $("model").value,
    messages: [
      { role: "system", content: $("system").value },
      ...thread,
      { role: "user", content: question },
    ],
    max_tokens: 256,
    stream: true,
    stream_options: { include_usage: true },
  };
  const started = performance.now();
  let first = null;
  let usage = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += value;
      const events = buffered.split("\n\n");
      buffered = events.pop();
      for (const event of events) {
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const data = JSON.parse(event.slice(6));
        if (data.error) throw new Error(data.error.message);
        if (data.usage) usage = data.usage;
        const text = data.choices && data.choices[0] && data.choices[0].delta.content;
        if (text) {
          if (first === null) first = performance.now();
          answer.textContent += text;
        }
      }
    }
    const ended = performance.now();
    thread.push({ role: "user", content: question }, { role: "assistant", content: answer.textContent });
    pending = answer.textContent;
    $("prompt").value = "";
    if (first !== null) {
      const tokens = usage ? usage.completion_tokens : null;
      const rate = tokens && ended > first ? ((tokens - 1) / ((ended - first) / 1000)).toFixed(1) : "?";
      $("speed").textContent = `TTFT ${(first - started).toFixed(0)} ms · ${rate} tokens/s` + (tokens ? ` · ${tokens} tokens` : "");
    }
    await standing();
  } catch (error) {
    $("thread").lastChild.remove(); // not part of the conversation: the question stays in the box
    say(error.message, true);
  } finally {
    $("send").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = key();
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(STORE, $("key").value.trim());
    try {
      await connect();
    } catch (error) {
      $("model").replaceChildren();
      $("model").disabled = $("send").disabled = true;
      say(error.message, true);
    }
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(STORE);
    $("key").value = "";
    say("Key forgotten.");
  });
  $("send").addEventListener("click", send);
  $("new-chat").addEventListener("click", newChat);
  if (key()) $("key-form").requestSubmit();
});
