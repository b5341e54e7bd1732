// Shows the Validate Dataset report on the node itself, so problems are readable where they are
// fixed instead of only in the server log.
import { app } from "../../scripts/app.js";

const EXTENSION = "flux2_lora.ValidationReport";
const NODE = "Flux2LoraValidateDataset";
const WIDGET = "flux2_lora_report";

// A read-only monospace text box (addDOMWidget is the frontend's public widget API; the older
// ComfyWidgets.STRING lives in scripts/widgets.js, which the frontend marks as internal).
function reportWidget(node) {
    const existing = node.widgets?.find((w) => w.name === WIDGET);
    if (existing) return existing;
    const area = document.createElement("textarea");
    area.readOnly = true;
    area.spellcheck = false;
    Object.assign(area.style, {
        fontFamily: "monospace", fontSize: "11px", whiteSpace: "pre", opacity: "0.85",
        width: "100%", height: "100%", boxSizing: "border-box", resize: "none",
    });
    const widget = node.addDOMWidget(WIDGET, "flux2_lora_report", area, {
        serialize: false, // the report is output, not a setting to save in the workflow
        getValue: () => area.value,
        setValue: (value) => { area.value = value ?? ""; },
    });
    widget.serialize = false;
    return widget;
}

// The frontend imports this file once per URL the server lists for it, and rejects a second
// registration of the same name: register only once.
if (!(app.extensions ?? []).some?.((e) => e?.name === EXTENSION)) {
    app.registerExtension({
        name: EXTENSION,
        async beforeRegisterNodeDef(nodeType, nodeData) {
            if (nodeData?.name !== NODE) return;

            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (message) {
                onExecuted?.apply(this, arguments);
                const text = Array.isArray(message?.text) ? message.text.join("\n") : message?.text;
                if (typeof text !== "string") return;
                reportWidget(this).value = text;
                this.setSize([Math.max(this.size[0], 520), Math.max(this.size[1], 320)]);
                app.graph.setDirtyCanvas(true, true);
            };
        },
    });
}
