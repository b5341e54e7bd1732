// "Stop and save" on the Train node: asks the running Train to finish its step, write a checkpoint and return
// the LoRA trained so far, so the rest of the graph (Save LoRA, a sampler) still runs. ComfyUI's Cancel stops the
// same way but ends the prompt. The request goes to the pack's route (POST /flux2_lora/stop, nodes/events.py)
// with the prompt and node the live events named; the button knows a run only from those events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "flux2_lora.StopAndSave";
const NODE = "Flux2LoraTrain";
const LABEL = "Stop and save";
const FINAL = ["done", "stopped", "cancelled", "failed"];
const running = new Map(); // node id (as the events name it) -> prompt id, while a Train runs

function label(node, text) {
    const button = node?.widgets?.find((w) => w.flux2Stop);
    if (!button) return;
    button.label = text;
    app.graph?.setDirtyCanvas(true, true);
}

function trainNode(id) {
    const node = app.graph?.getNodeById?.(id) ?? app.graph?.getNodeById?.(Number(id));
    return (node?.comfyClass ?? node?.type) === NODE ? node : null;
}

async function stop(node) {
    const nodeId = String(node.id);
    const promptId = running.get(nodeId);
    if (!promptId) {
        label(node, `${LABEL} (not running)`);
        return;
    }
    label(node, "Stopping after this step...");
    try {
        const response = await api.fetchApi("/flux2_lora/stop", {
            method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ prompt_id: promptId, node_id: nodeId }),
        });
        if (!response.ok) label(node, `${LABEL} (${response.status === 409 ? "not running" : "refused"})`);
    } catch (error) {
        console.warn(`${EXTENSION}: the stop request failed`, error);
        label(node, LABEL);
    }
}

// The frontend imports this file once per URL the server lists for it, and rejects a second
// registration of the same name: register only once.
if (!(app.extensions ?? []).some?.((e) => e?.name === EXTENSION)) {
    app.registerExtension({
        name: EXTENSION,
        async setup() {
            api.addEventListener("flux2_lora.progress", ({ detail }) => {
                if (detail?.kind !== "train" || detail.node === undefined || detail.node === null) return;
                const id = String(detail.node);
                if (FINAL.includes(detail.phase)) {
                    running.delete(id);
                    label(trainNode(id), LABEL);
                } else if (running.get(id) !== detail.prompt_id) {
                    running.set(id, detail.prompt_id);
                    label(trainNode(id), LABEL);
                }
            });
        },
        async beforeRegisterNodeDef(nodeType, nodeData) {
            if (nodeData?.name !== NODE) return;
            const onNodeCreated = nodeType.prototype.onNodeCreated;
            nodeType.prototype.onNodeCreated = function () {
                const result = onNodeCreated?.apply(this, arguments);
                const button = this.addWidget("button", LABEL, null, () => stop(this));
                button.serialize = false; // an action, not a value: it must not shift the saved widget values
                button.flux2Stop = true;
                return result;
            };
        },
    });
}
