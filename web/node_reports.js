// Shows a node's text output on the node itself, where it is acted on instead of only in the server log:
// Validate Dataset's report (problems are fixed where they are read), Configure LoRA's and Load Training
// Model's memory notes (the settings that decide whether a step fits sit right above them). The box always
// shows the latest run's outcome: it is cleared when the node starts again, and a failed run shows its error
// (a failed validation's error carries the report) instead of the last good one. It keeps the node's width:
// long lines scroll inside the box rather than widening the node over its neighbours.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "flux2_lora.NodeReports";
// node type -> what the box says while it runs
const NODES = {
    Flux2LoraValidateDataset: "validating...",
    Flux2LoraConfigureLora: "predicting memory...",
    Flux2LoraLoadTrainingModel: "reading the model's header...",
};
const WIDGET = "flux2_lora_report";
const MIN_HEIGHT = 140; // px: a few lines of the report; the box scrolls for the rest

// A read-only monospace text box (addDOMWidget is the frontend's public widget API; the older
// ComfyWidgets.STRING lives in scripts/widgets.js, which the frontend marks as internal).
function reportWidget(node) {
    const existing = node.widgets?.find((w) => w.name === WIDGET);
    if (existing) return existing;
    const area = document.createElement("textarea");
    area.readOnly = true;
    area.spellcheck = false;
    area.wrap = "off";
    Object.assign(area.style, {
        fontFamily: "monospace", fontSize: "11px", whiteSpace: "pre", overflow: "auto", opacity: "0.85",
        width: "100%", height: "100%", boxSizing: "border-box", resize: "none",
    });
    const widget = node.addDOMWidget(WIDGET, "flux2_lora_report", area, {
        serialize: false, // the report is output, not a setting to save in the workflow
        getValue: () => area.value,
        setValue: (value) => { area.value = value ?? ""; },
        getMinHeight: () => MIN_HEIGHT,
    });
    widget.serialize = false;
    return widget;
}

function show(node, text) {
    reportWidget(node).value = text;
    // Taller if the box needs it, never wider: the width is the user's layout.
    node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
    app.graph.setDirtyCanvas(true, true);
}

// The pack's reporting node an execution event is about, if any (ids arrive as strings).
function reportingNode(id) {
    if (id === undefined || id === null) return null;
    const node = app.graph?.getNodeById?.(id) ?? app.graph?.getNodeById?.(Number(id));
    return NODES[node?.comfyClass] !== undefined || NODES[node?.type] !== undefined ? node : null;
}

function nodeType(node) {
    return NODES[node.comfyClass] !== undefined ? node.comfyClass : node.type;
}

// The frontend imports this file once per URL the server lists for it, and rejects a second
// registration of the same name: register only once.
if (!(app.extensions ?? []).some?.((e) => e?.name === EXTENSION)) {
    app.registerExtension({
        name: EXTENSION,
        async setup() {
            api.addEventListener("executing", ({ detail }) => {
                const node = reportingNode(detail?.node ?? detail);
                if (node && node.widgets?.some((w) => w.name === WIDGET)) show(node, NODES[nodeType(node)]);
            });
            api.addEventListener("execution_error", ({ detail }) => {
                const node = reportingNode(detail?.node_id);
                if (node) show(node, String(detail?.exception_message ?? `${nodeType(node)} failed`));
            });
        },
        async beforeRegisterNodeDef(nodeType, nodeData) {
            if (NODES[nodeData?.name] === undefined) return;

            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (message) {
                onExecuted?.apply(this, arguments);
                const text = Array.isArray(message?.text) ? message.text.join("\n") : message?.text;
                if (typeof text === "string") show(this, text);
            };
        },
    });
}
