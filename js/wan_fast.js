// Wan Fast front-end extension:
// - preset buttons on the sampler nodes: one click switches between the official base settings
//   and the 4-step distill settings (steps, guidance, shift, scheduler, step list);
// - the last run's per-stage timings and peak VRAM drawn on the sampler nodes. Every Wan node
//   returns its stage record in its "ui" output (key wan_timing); ComfyUI forwards it to the
//   browser as an "executed" event, even when the node's result came from the cache.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { PRESETS, applyPreset, matchingPreset, timingLines } from "./wan_presets.js";

const SAMPLERS = new Set(["WanSampler", "WanMultiGPUSampler"]);
const LINE_HEIGHT = 14;
let currentRun = { promptId: null, records: new Map() };

function samplerNodes() {
  return (app.graph?._nodes ?? []).filter((n) => SAMPLERS.has(n.comfyClass ?? n.type));
}

function refresh() {
  const records = [...currentRun.records.values()].flat();
  for (const node of samplerNodes()) {
    node.wanTimingLines = timingLines(records);
    const needed = node.computeSize()[1] + (node.wanTimingLines.length + 1) * LINE_HEIGHT + 8;
    if (node.size[1] < needed) node.setSize([node.size[0], needed]);
  }
  app.graph?.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "wan_fast.sampler",

  async setup() {
    api.addEventListener("execution_start", ({ detail }) => {
      currentRun = { promptId: detail?.prompt_id ?? null, records: new Map() };
      refresh();
    });
    api.addEventListener("executed", ({ detail }) => {
      const records = detail?.output?.wan_timing;
      if (!records) return;
      if (detail.prompt_id && currentRun.promptId && detail.prompt_id !== currentRun.promptId) return;
      currentRun.records.set(String(detail.node), records);
      refresh();
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SAMPLERS.has(nodeData.name)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      // Buttons go after the real widgets and are never serialized, so saved workflows and
      // API prompts are unchanged by this extension.
      for (const name of Object.keys(PRESETS)) {
        const button = this.addWidget("button", `preset: ${name}`, null, () => {
          applyPreset(this.widgets, name);
          this.setDirtyCanvas(true, true);
        });
        button.serialize = false;
        button.options = { ...(button.options ?? {}), serialize: false };
      }
      this.setSize([this.size[0], this.computeSize()[1] + LINE_HEIGHT + 8]);
      return r;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return r;
      const preset = matchingPreset(this.widgets ?? []);
      const lines = [preset ? `settings: ${preset}` : "settings: custom", ...(this.wanTimingLines ?? [])];
      ctx.save();
      ctx.font = "11px monospace";
      ctx.fillStyle = "#9ab";
      let y = this.size[1] - lines.length * LINE_HEIGHT;
      for (const line of lines) {
        ctx.fillText(line, 10, y);
        y += LINE_HEIGHT;
      }
      ctx.restore();
      return r;
    };
  },
});
