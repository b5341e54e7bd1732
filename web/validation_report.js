// Shows the Validate Dataset report on the node itself, so problems are readable where they are
// fixed instead of only in the server log. The box always shows the latest run's outcome: it is
// cleared when the node starts again, and a failed run shows its error (which carries the report)
// instead of the last good one. It keeps the node's width: long lines scroll inside the box rather
// than widening the node over its neighbours.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "flux2_lora.ValidationReport";
const NODE = "Flux2LoraValidateDataset";
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

// The Validate Dataset node an execution event is about, if any (ids arrive as strings).
function validateNode(id) {
    if (id === undefined || id === null) return null;
    const node = app.graph?.getNodeById?.(id) ?? app.graph?.getNodeById?.(Number(id));
    return node?.comfyClass === NODE || node?.type === NODE ? node : null;
}

// The frontend imports this file once per URL the server lists for it, and rejects a second
// registration of the same name: register only once.
if (!(app.extensions ?? []).some?.((e) => e?.name === EXTENSION)) {
    app.registerExtension({
        name: EXTENSION,
        async setup() {
            api.addEventListener("executing", ({ detail }) => {
                const node = validateNode(detail?.node ?? detail);
                if (node && node.widgets?.some((w) => w.name === WIDGET)) show(node, "validating...");
            });
            api.addEventListener("execution_error", ({ detail }) => {
                const node = validateNode(detail?.node_id);
                if (node) show(node, String(detail?.exception_message ?? "Validate Dataset failed"));
            });
        },
        async beforeRegisterNodeDef(nodeType, nodeData) {
            if (nodeData?.name !== NODE) return;

            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (message) {
                onExecuted?.apply(this, arguments);
                const text = Array.isArray(message?.text) ? message.text.join("\n") : message?.text;
                if (typeof text === "string") show(this, text);
            };
        },
    });
}
