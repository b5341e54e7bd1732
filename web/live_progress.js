// Live training feedback on the nodes themselves: ComfyUI only forwards a fraction (and only when it moved
// 0.5%), so the pack sends its own "flux2_lora.progress" events (nodes/events.py) and this draws them.
// Train: phase and its progress, step/total, loss raw/smoothed, lr, s/step, ETA, peak memory, a loss chart and
// the latest sample of every sample prompt. Cache Latents: its phases. Train, Cache Latents and Save LoRA keep
// their summary after finishing. Events for nodes not in this graph (another tab's, a subgraph's) are ignored.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "flux2_lora.LiveProgress";
const EVENT = "flux2_lora.progress";
const WIDGET = "flux2_lora_live";
const NODES = { Flux2LoraTrain: "train", Flux2LoraCacheLatents: "cache", Flux2LoraSaveLora: "save" };
const MIN_HEIGHT = { train: 330, cache: 70, save: 40 };
const MAX_POINTS = 4000; // chart points kept; beyond, neighbours are merged (a 100k-step run stays light)
const state = new WeakMap(); // node -> {prompt, losses: [[step, loss]], last: event}

function ourNode(id) {
    if (id === undefined || id === null) return null;
    const node = app.graph?.getNodeById?.(id) ?? app.graph?.getNodeById?.(Number(id));
    const kind = NODES[node?.comfyClass ?? node?.type];
    return kind ? { node, kind } : null;
}

function element(tag, style, parent) {
    const el = document.createElement(tag);
    Object.assign(el.style, style);
    parent?.appendChild(el);
    return el;
}

function panel(node, kind) {
    const existing = node.widgets?.find((w) => w.name === WIDGET);
    if (existing) return existing.flux2;
    const root = element("div", { display: "flex", flexDirection: "column", gap: "4px", width: "100%",
        height: "100%", boxSizing: "border-box", fontFamily: "monospace", fontSize: "11px", overflow: "hidden" });
    const parts = {
        status: element("pre", { margin: "0", whiteSpace: "pre-wrap", opacity: "0.9" }, root),
        bar: element("progress", { width: "100%", height: "6px", display: "none" }, root),
        chart: kind === "train" ? element("canvas", { width: "100%", height: "120px", display: "none" }, root) : null,
        samples: kind === "train" ? element("div", { display: "flex", gap: "4px", flexWrap: "wrap" }, root) : null,
        summary: element("pre", { margin: "0", whiteSpace: "pre-wrap", fontWeight: "bold" }, root),
    };
    const widget = node.addDOMWidget(WIDGET, "flux2_lora_live", root, {
        serialize: false, // live output, not a setting to save in the workflow
        getMinHeight: () => MIN_HEIGHT[kind],
    });
    widget.serialize = false;
    widget.flux2 = parts;
    return parts;
}

const number = (v, digits = 4) => (typeof v === "number" && Number.isFinite(v) ? v.toPrecision(digits) : "-");

function duration(seconds) {
    if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "-";
    const s = Math.round(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

function memory(mb) {
    if (typeof mb !== "number" || !Number.isFinite(mb)) return "-";
    return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GiB` : `${mb.toFixed(0)} MiB`;
}

function statusText(e) {
    const phase = `${e.phase ?? "-"}${e.detail ? ` (${e.detail})` : ""}` + (e.total ? ` ${e.done}/${e.total}` : "");
    if (e.step === undefined) return phase;
    return [phase,
        `step ${e.step}/${e.steps}   loss ${number(e.loss)} (smoothed ${number(e.smoothed_loss)})   lr ${number(e.lr, 3)}`
            + (typeof e.validation_loss === "number" ? `   held out ${number(e.validation_loss)}` : ""),
        `${number(e.seconds_per_step, 3)} s/step   ETA ${duration(e.eta_seconds)}   peak memory ${memory(e.peak_memory_mb)}`,
    ].join("\n");
}

function finitePoints(points) {
    return (Array.isArray(points) ? points : []).filter((p) => Array.isArray(p) && typeof p[1] === "number"
        && Number.isFinite(p[1])).map((p) => [p[0], p[1]]);
}

function addLosses(s, points, validation) {
    s.losses.push(...finitePoints(points));
    s.validation.push(...finitePoints(validation)); // one point per validate_every steps: never merged
    while (s.losses.length > MAX_POINTS) { // merge neighbours: the curve's shape stays, the memory does not grow
        const merged = [];
        for (let i = 0; i + 1 < s.losses.length; i += 2) {
            merged.push([s.losses[i + 1][0], (s.losses[i][1] + s.losses[i + 1][1]) / 2]);
        }
        s.losses = merged;
    }
}

function drawChart(canvas, losses, validation = []) {
    if (!canvas || losses.length < 2) return;
    canvas.style.display = "block";
    const width = (canvas.width = Math.max(100, canvas.clientWidth || 300));
    const height = (canvas.height = 120);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const steps = losses.map((p) => p[0]), values = [...losses, ...validation].map((p) => p[1]);
    const [x0, x1] = [steps[0], steps[steps.length - 1]];
    const [lo, hi] = [Math.min(...values), Math.max(...values)];
    const x = (step) => 4 + ((step - x0) / Math.max(x1 - x0, 1)) * (width - 8);
    const y = (v) => height - 14 - ((v - lo) / Math.max(hi - lo, 1e-12)) * (height - 24);
    const line = (points, color, lineWidth) => {
        ctx.beginPath();
        points.forEach(([s, v], i) => (i ? ctx.lineTo(x(s), y(v)) : ctx.moveTo(x(s), y(v))));
        ctx.strokeStyle = color;
        ctx.lineWidth = lineWidth;
        ctx.stroke();
    };
    line(losses, "rgba(120, 160, 255, 0.45)", 1);
    let ema = values[0];
    const alpha = Math.min(0.5, 20 / losses.length + 0.02);
    line(losses.map(([s, v]) => [s, (ema = ema + alpha * (v - ema))]), "rgb(255, 170, 60)", 2);
    if (validation.length) line(validation, "rgb(240, 80, 80)", 2); // the held-out loss
    ctx.fillStyle = "rgba(200, 200, 200, 0.9)";
    ctx.font = "10px monospace";
    ctx.fillText(`loss ${number(lo, 3)} .. ${number(hi, 3)}   steps ${x0}..${x1}`
        + (validation.length ? "   red: held out" : ""), 4, height - 2);
}

function showSamples(div, samples) {
    if (!div || !Array.isArray(samples)) return;
    div.replaceChildren(...samples.filter((r) => typeof r?.filename === "string").map((r) => {
        const query = new URLSearchParams({ filename: r.filename, subfolder: r.subfolder ?? "", type: r.type ?? "output" });
        const img = element("img", { maxWidth: "48%", maxHeight: "160px", objectFit: "contain" });
        img.src = api.apiURL(`/view?${query}`);
        img.title = `sample prompt ${Number(r.prompt) + 1}, step ${r.step}`;
        return img;
    }));
}

function onEvent(detail) {
    const found = ourNode(detail?.node);
    if (!found || typeof detail !== "object") return;
    const { node, kind } = found;
    const parts = panel(node, kind);
    let s = state.get(node);
    if (!s || s.prompt !== detail.prompt_id) { // a new run on this node: start clean
        s = { prompt: detail.prompt_id, losses: [], validation: [] };
        state.set(node, s);
        parts.summary.textContent = "";
        parts.samples?.replaceChildren();
    }
    addLosses(s, detail.losses, detail.validation);
    parts.status.textContent = statusText(detail);
    const live = !["done", "stopped", "cancelled", "failed"].includes(detail.phase) && detail.total > 0;
    parts.bar.style.display = live ? "block" : "none";
    if (live) Object.assign(parts.bar, { max: detail.total, value: detail.done });
    if (typeof detail.summary === "string") parts.summary.textContent = detail.summary;
    drawChart(parts.chart, s.losses, s.validation);
    if (detail.samples?.length) showSamples(parts.samples, detail.samples);
    node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
    app.graph.setDirtyCanvas(true, true);
}

// The frontend imports this file once per URL the server lists for it, and rejects a second
// registration of the same name: register only once.
if (!(app.extensions ?? []).some?.((e) => e?.name === EXTENSION)) {
    app.registerExtension({
        name: EXTENSION,
        async setup() {
            api.addEventListener(EVENT, ({ detail }) => {
                try {
                    onEvent(detail);
                } catch (error) { // a malformed event must not break the page
                    console.warn(`${EXTENSION}: event ignored`, error);
                }
            });
        },
        async beforeRegisterNodeDef(nodeType, nodeData) {
            const kind = NODES[nodeData?.name];
            if (!kind) return;
            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (message) { // the summary ComfyUI keeps in its history
                onExecuted?.apply(this, arguments);
                const text = Array.isArray(message?.text) ? message.text.join("\n") : message?.text;
                if (typeof text !== "string") return;
                panel(this, kind).summary.textContent = text;
                this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
                app.graph.setDirtyCanvas(true, true);
            };
        },
    });
}
