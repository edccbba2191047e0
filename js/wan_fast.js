// Wan Fast front-end extension:
// - preset buttons on the sampler nodes: one click switches between the official base settings
//   and the 4-step distill settings (steps, guidance, shift, scheduler, step list);
// - the last run's per-stage timings and peak VRAM drawn on the sampler nodes. Every Wan node
//   returns its stage record in its "ui" output (key wan_timing); ComfyUI forwards it to the
//   browser as an "executed" event, even when the node's result came from the cache.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { PRESETS, applyPreset, matchingPreset, timingLines } from "./wan_presets.js";

const SAMPLERS = new Set(["WanSampler", "WanMultiGPUSampler"]); // preset buttons
const TIMED = new Set([...SAMPLERS, "WanSamplerMoE", "WanMultiGPUSamplerMoE"]); // the last run's timings (the two-expert sampler: no presets)
const LINE_HEIGHT = 14;
let currentRun = { promptId: null, records: new Map() };
const lastRecords = new Map(); // node id -> its stage records from the run that last executed it

function samplerNodes() {
  return (app.graph?._nodes ?? []).filter((n) => TIMED.has(n.comfyClass ?? n.type));
}

function refresh() {
  const records = [...currentRun.records.values()].flat();
  for (const node of samplerNodes()) {
    node.wanTimingLines = timingLines(records);
    const needed = node.computeSize()[1];
    if (node.size[1] < needed) node.setSize([node.size[0], needed]);
  }
  app.graph?.setDirtyCanvas(true, true);
}

// A read-only text block, laid out like a widget (so live previews go below it, not over it)
// and never serialized (saved workflows and API prompts are unchanged).
function timingWidget(node, presets) {
  const lines = () => {
    if (!presets) return node.wanTimingLines ?? [];
    const preset = matchingPreset((node.widgets ?? []).filter((w) => w.type !== "wan_timing"));
    return [preset ? `settings: ${preset}` : "settings: custom", ...(node.wanTimingLines ?? [])];
  };
  const height = () => lines().length * LINE_HEIGHT + 6;
  return {
    name: "wan_timing",
    type: "wan_timing",
    value: null,
    serialize: false,
    options: { serialize: false },
    draw(ctx, _node, width, y) {
      ctx.save();
      ctx.font = "11px monospace";
      ctx.fillStyle = "#9ab";
      let yy = y + LINE_HEIGHT;
      for (const line of lines()) {
        ctx.fillText(line, 12, yy, width - 24);
        yy += LINE_HEIGHT;
      }
      ctx.restore();
    },
    computeSize(width) {
      return [width, height()];
    },
    computeLayoutSize() {
      return { minHeight: height(), maxHeight: height(), minWidth: 0 };
    },
  };
}

app.registerExtension({
  name: "wan_fast.sampler",

  async setup() {
    api.addEventListener("execution_start", ({ detail }) => {
      currentRun = { promptId: detail?.prompt_id ?? null, records: new Map() };
      refresh();
    });
    // nodes whose result ComfyUI reuses are not run again: show their stages as cached
    api.addEventListener("execution_cached", ({ detail }) => {
      for (const id of detail?.nodes ?? []) {
        const old = lastRecords.get(String(id));
        if (old) currentRun.records.set(String(id), old.map((r) => ({ ...r, cached: true })));
      }
      refresh();
    });
    api.addEventListener("executed", ({ detail }) => {
      const records = detail?.output?.wan_timing;
      if (!records) return;
      if (detail.prompt_id && currentRun.promptId && detail.prompt_id !== currentRun.promptId) return;
      currentRun.records.set(String(detail.node), records);
      lastRecords.set(String(detail.node), records);
      refresh();
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TIMED.has(nodeData.name)) return;
    const presets = SAMPLERS.has(nodeData.name);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      // Buttons go after the real widgets and are never serialized, so saved workflows and
      // API prompts are unchanged by this extension.
      for (const name of presets ? Object.keys(PRESETS) : []) {
        const button = this.addWidget("button", `preset: ${name}`, null, () => {
          applyPreset(this.widgets, name);
          this.setDirtyCanvas(true, true);
        });
        button.serialize = false; // a button holds no value: keep widgets_values as they were
        button.options = { ...(button.options ?? {}), serialize: false };
      }
      this.addCustomWidget(timingWidget(this, presets));
      this.setSize([this.size[0], this.computeSize()[1]]);
      return r;
    };
  },
});
