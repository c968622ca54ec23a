// The console: a playground and the key's own standing, over the service's public API.
// The key lives in this tab's sessionStorage only, and travels as a header, never a cookie.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "hermes-serve-key";

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
}

async function send() {
  const answer = $("answer");
  answer.textContent = "";
  $("speed").textContent = "";
  $("send").disabled = true;
  const body = {
    model: $("model").value,
    messages: [
      { role: "system", content: $("system").value },
      { role: "user", content: $("prompt").value },
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
    if (first !== null) {
      const tokens = usage ? usage.completion_tokens : null;
      const rate = tokens && ended > first ? ((tokens - 1) / ((ended - first) / 1000)).toFixed(1) : "?";
      $("speed").textContent = `TTFT ${(first - started).toFixed(0)} ms · ${rate} tokens/s` + (tokens ? ` · ${tokens} tokens` : "");
    }
    await standing();
  } catch (error) {
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
  if (key()) $("key-form").requestSubmit();
});
