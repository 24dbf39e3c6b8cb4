// selfhost chat page: streams /v1/chat/completions and polls /stats. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let busy = false;
let pendingCalls = [];  // tool calls of the last reply still waiting for their results

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

function showError(message) { $("error").textContent = message || ""; }

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || body.error || response.statusText;
  } catch { return `${response.status} ${response.statusText}`; }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { showError(await errorMessage(response)); return; }
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const model of (await response.json()).data) {
    select.append(new Option(model.id, model.id, false, model.id === previous));
  }
  showError("");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Parse server-sent events from a fetch body; calls onData with each `data:` payload.
async function readEvents(response, onData) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

function toolsField() {
  const text = $("tools").value.trim();
  if (!text) return {};
  let tools;
  try { tools = JSON.parse(text); } catch (err) { throw new Error(`Tools: not JSON (${err.message})`); }
  // One call a turn: the page asks for each result in turn, so one at a time reads best.
  return { tools, tool_choice: $("tool-choice").value, parallel_tool_calls: false };
}

function showCall(call) {
  const div = addMessage("tool-call", `${call.function.name}(${call.function.arguments})`);
  div.dataset.name = call.function.name;
  return div;
}

function updatePrompt() {
  $("prompt").placeholder = pendingCalls.length
    ? `Result of ${pendingCalls[0].function.name} (sent as the tool's reply)`
    : "Say something (Enter to send, Shift+Enter for a new line)";
}

async function send(text) {
  busy = true;
  $("send").disabled = true;
  showError("");
  const call = pendingCalls.shift();
  // With a call waiting, the message is that call's result; otherwise a user turn.
  history.push(call ? { role: "tool", tool_call_id: call.id, content: text } : { role: "user", content: text });
  addMessage(call ? "tool-result" : "user", text);
  updatePrompt();
  if (pendingCalls.length) { busy = false; $("send").disabled = false; return; }  // more results to give first
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  let reply = "";
  const calls = [];
  const blocks = [];
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: $("model").value,
        messages: history,
        stream: true,
        max_tokens: Number($("max-tokens").value) || undefined,
        temperature: Number($("temperature").value),
        ...toolsField(),
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices?.[0]?.delta;
      if (delta?.content) {
        reply += delta.content;
        bubble.textContent = reply;
        bubble.scrollIntoView({ block: "end" });
      }
      for (const part of delta?.tool_calls || []) {  // a call's id and name first, then its arguments in pieces
        if (part.id) {
          calls[part.index] = { id: part.id, type: "function", function: { name: part.function.name, arguments: "" } };
          blocks[part.index] = showCall(calls[part.index]);
        }
        const call = calls[part.index];
        call.function.arguments += part.function?.arguments || "";
        blocks[part.index].textContent = `${call.function.name}(${call.function.arguments})`;
      }
    });
    if (!reply && calls.length) bubble.remove();
    history.push(calls.length ? { role: "assistant", content: reply || null, tool_calls: calls }
                              : { role: "assistant", content: reply });
    pendingCalls = calls.slice();
    updatePrompt();
  } catch (err) {
    history.pop();
    showError(err.message);
  } finally {
    bubble.classList.remove("streaming");
    busy = false;
    $("send").disabled = false;
  }
}

function fmt(value, digits = 1) { return Number.isFinite(value) ? value.toFixed(digits) : "–"; }

async function pollStats() {
  try {
    const response = await fetch("/stats");
    if (response.ok) {
      const stats = await response.json();
      const model = stats.models[$("model").value] || Object.values(stats.models)[0];
      $("stat-tps").textContent = fmt(stats.tokens_per_s);
      if (model) {
        $("stat-running").textContent = model.running;
        $("stat-waiting").textContent = model.waiting;
        $("stat-kv").textContent = `${fmt(100 * model.kv_usage)}% (${model.kv_blocks_used}/${model.kv_blocks_total}) `;
        $("stat-kv-meter").value = model.kv_usage;
        $("stat-prefix").textContent = `${fmt(100 * model.prefix_hit_rate)}%`;
        // Speculative decoding: accepted share of proposals, tokens per verifying step.
        $("stat-spec-label").hidden = $("stat-spec").hidden = !model.speculative;
        if (model.speculative) {
          $("stat-spec").textContent =
            `${model.speculative}: ${fmt(100 * model.spec_acceptance_rate)}% accepted, ${fmt(model.spec_mean_accepted_length, 2)} tok/step`;
        }
      }
    }
  } catch { /* server restarting: try again next tick */ }
  setTimeout(pollStats, 1000);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || busy || !$("model").value) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("reset").addEventListener("click", () => {
  history.length = 0; pendingCalls = []; updatePrompt(); $("messages").replaceChildren(); showError("");
});
$("api-key").addEventListener("change", () => { localStorage.setItem("selfhost-api-key", $("api-key").value); loadModels(); });

$("api-key").value = localStorage.getItem("selfhost-api-key") || "";
loadModels();
pollStats();
