// Sampler presets and the run-timing summary, as plain functions (no ComfyUI imports), so
// that they can be tested outside a browser (tests/test_nodes.py runs them under Node.js).

// Official Wan2.1 settings and the lightx2v 4-step distill settings (FORMATS.md).
export const PRESETS = {
  "base T2V / I2V-720P": { steps: 50, guidance: 5.0, shift: 5.0, scheduler: "unipc" },
  "base I2V-480P": { steps: 40, guidance: 5.0, shift: 3.0, scheduler: "unipc" },
  "4-step distill": {
    steps: 4,
    guidance: 1.0,
    shift: 5.0,
    scheduler: "distill",
    denoising_step_list: "1000,750,500,250",
  },
};

// Set the sampler's widgets ([{name, value, callback?}]) to a preset; returns the names changed.
export function applyPreset(widgets, presetName) {
  const preset = PRESETS[presetName];
  if (!preset) throw new Error(`unknown preset ${presetName}`);
  const changed = [];
  for (const w of widgets) {
    if (Object.prototype.hasOwnProperty.call(preset, w.name) && w.value !== preset[w.name]) {
      w.value = preset[w.name];
      if (typeof w.callback === "function") w.callback(w.value);
      changed.push(w.name);
    }
  }
  return changed;
}

// Which preset the widgets currently match, or null.
export function matchingPreset(widgets) {
  const values = Object.fromEntries(widgets.map((w) => [w.name, w.value]));
  for (const [name, preset] of Object.entries(PRESETS)) {
    if (Object.entries(preset).every(([k, v]) => values[k] === v)) return name;
  }
  return null;
}

function fmtSeconds(s) {
  return s >= 100 ? `${s.toFixed(0)} s` : s >= 10 ? `${s.toFixed(1)} s` : `${s.toFixed(2)} s`;
}

// Stage records ({stage, seconds, peak_vram_gib, seconds_per_step?, cached?}) -> lines of text to draw.
// Cached stages (results ComfyUI reused) are listed but count for nothing in the total.
export function timingLines(records) {
  const lines = [];
  let total = 0;
  let peak = null;
  for (const r of records) {
    if (r.cached) {
      lines.push(`${r.stage}: cached`);
      continue;
    }
    total += r.seconds || 0;
    if (r.peak_vram_gib != null) peak = Math.max(peak ?? 0, r.peak_vram_gib);
    let line = `${r.stage}: ${fmtSeconds(r.seconds || 0)}`;
    if (r.seconds_per_step != null) line += ` (${r.steps} steps, ${fmtSeconds(r.seconds_per_step)}/step)`;
    if (r.peak_vram_gib != null) line += `, peak ${r.peak_vram_gib.toFixed(1)} GiB`;
    lines.push(line);
  }
  if (records.length) {
    lines.push(`total: ${fmtSeconds(total)}` + (peak != null ? `, peak VRAM ${peak.toFixed(1)} GiB` : ", peak VRAM n/a (CPU)"));
  }
  return lines;
}
