// ConceptEdit front end: what an edit looks like, in the graph.
//
// 1. "Concept Edit Info" nodes (ConceptEditEditInfo) show the edit they received: a heat map of the
//    per-layer change (pruned fraction for ConceptPrune masks, ‖ΔW‖ for closed-form/trained edits;
//    rows = transformer blocks in execution order, then text-encoder layers), the concepts, the base
//    model's fingerprint and the metrics measured when the edit was made. The data comes from the
//    node's {"ui": {"conceptedit_edit": [view]}} message (see editing/report/view.py: edit_view).
// 2. Every ConceptEdit node with a multi-line "concepts" input gets a "concept preset" dropdown that
//    fills the list (it is not sent with the prompt).
//
// Plain ES module, no build step: ComfyUI serves this folder (WEB_DIRECTORY = "./web").
import { app } from "../../scripts/app.js";

const VIEW_NODE = "ConceptEditEditInfo";
const UI_KEY = "conceptedit_edit";
const PRESET_WIDGET = "concept preset";
const PRESET_PROMPT = "(fill concepts from a preset…)";

// Concept lists a person would otherwise type by hand. The tiny entries are the bundled tiny
// model's world (tiny/world.py); the others are the sets the papers evaluate on.
export const CONCEPT_PRESETS = {
	"tiny model: shapes": ["circle", "square", "triangle", "cross", "star", "heart"],
	"tiny model: colours": ["red", "green", "blue", "yellow", "purple"],
	"tiny model: artist styles": ["monet", "mondrian", "hokusai"],
	"nudity": ["nudity"],
	"artists (erasure papers)": ["Van Gogh", "Pablo Picasso", "Claude Monet", "Salvador Dali", "Andy Warhol",
		"Rembrandt", "Leonardo da Vinci", "Kelly McKernan", "Thomas Kinkade", "Tyler Edlin", "Kilian Eng",
		"Ajin: Demi Human"],
	"objects (Imagenette classes)": ["cassette player", "chain saw", "church", "English springer", "French horn",
		"garbage truck", "gas pump", "golf ball", "parachute", "tench"],
};

// ---- the heat map ------------------------------------------------------------------------------
// A perceptually ordered ramp (dark blue -> teal -> yellow), so "more" is always "brighter".
const RAMP = [[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104],
	[244, 136, 73], [254, 188, 43], [240, 249, 33]];
const EMPTY = [40, 40, 44];

export function rampColour(t) {
	if (!(t >= 0)) return EMPTY; // null, NaN
	t = Math.min(1, t);
	const x = t * (RAMP.length - 1);
	const i = Math.min(RAMP.length - 2, Math.floor(x));
	const f = x - i;
	return RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
}

function scales(hm) {
	// one scale for the whole map; per column when the columns hold different quantities
	const cols = hm.cols.length;
	const max = new Array(cols).fill(0);
	for (const row of hm.values) row.forEach((v, c) => { if (v != null && v > max[c]) max[c] = v; });
	if (hm.quantity !== "mixed") return max.map(() => hm.max || Math.max(...max, 0));
	return max;
}

export function drawHeatmap(canvas, hm) {
	const rows = hm.rows.length, cols = hm.cols.length;
	const labelW = 64, headH = 16, footH = 16;
	const cellH = Math.max(3, Math.min(14, Math.floor(360 / Math.max(rows, 1))));
	const cellW = Math.max(28, Math.min(60, Math.floor(240 / Math.max(cols, 1))));
	canvas.width = Math.max(labelW + cols * cellW + 2, 300); // room for the legend line
	canvas.height = headH + rows * cellH + footH;
	const ctx = canvas.getContext("2d");
	ctx.fillStyle = "#1b1b1e";
	ctx.fillRect(0, 0, canvas.width, canvas.height);
	ctx.font = "10px sans-serif";
	ctx.textBaseline = "middle";
	ctx.fillStyle = "#ccc";
	hm.cols.forEach((c, j) => ctx.fillText(c.slice(0, 8), labelW + j * cellW + 2, headH / 2));
	const max = scales(hm);
	for (let i = 0; i < rows; i++) {
		const y = headH + i * cellH;
		if (cellH >= 9 || i % Math.ceil(9 / cellH) === 0) {
			ctx.fillStyle = "#aaa";
			ctx.fillText(hm.rows[i].slice(0, 11), 2, y + cellH / 2);
		}
		for (let j = 0; j < cols; j++) {
			const v = hm.values[i][j];
			const [r, g, b] = v == null ? EMPTY : rampColour(max[j] > 0 ? v / max[j] : 0);
			ctx.fillStyle = `rgb(${r},${g},${b})`;
			ctx.fillRect(labelW + j * cellW, y, cellW - 1, Math.max(1, cellH - 1));
		}
	}
	ctx.fillStyle = "#ccc";
	const top = hm.quantity === "mixed" ? "per-column max" : `max ${fmt(hm.max)}`;
	ctx.fillText(`${hm.quantity} (bright = ${top}; grey = unchanged)`, 2, headH + rows * cellH + footH / 2);
	canvas.dataset.rows = String(rows);
	canvas.dataset.cols = String(cols);
	canvas.dataset.cellW = String(cellW);
	canvas.dataset.cellH = String(cellH);
	canvas.dataset.originX = String(labelW);
	canvas.dataset.originY = String(headH);
	canvas.dataset.drawn = "1";
}

function fmt(v) {
	if (typeof v !== "number") return String(v);
	if (v === 0) return "0";
	return Math.abs(v) >= 1000 || Math.abs(v) < 0.001 ? v.toExponential(2) : String(+v.toPrecision(4));
}

// ---- the info panel ------------------------------------------------------------------------------
function el(tag, cls, text) {
	const e = document.createElement(tag);
	if (cls) e.className = cls;
	if (text != null) e.textContent = text; // never innerHTML: concept names are user text
	return e;
}

export function renderView(root, view) {
	root.replaceChildren();
	root.appendChild(el("div", "ce-title", `${view.method} · ${view.family_label} · ${view.n_keys} weights`));
	const concepts = el("div", "ce-concepts");
	for (const c of view.concepts || []) concepts.appendChild(el("span", "ce-chip", c));
	if (!(view.concepts || []).length) concepts.appendChild(el("span", "ce-muted", "no concepts recorded"));
	root.appendChild(concepts);
	const fp = view.fingerprint || {};
	root.appendChild(el("div", "ce-fingerprint",
		fp.family ? `base model: ${fp.family} · layout ${fp.layout || "?"} · weights ${fp.weights || "?"}`
			: "base model: unknown (no fingerprint)"));
	const metrics = el("table", "ce-metrics");
	for (const [k, v] of Object.entries(view.metrics || {})) {
		if (v !== null && typeof v === "object") continue; // nested histories stay in the text output
		const tr = el("tr");
		tr.appendChild(el("td", null, k));
		tr.appendChild(el("td", null, fmt(v)));
		metrics.appendChild(tr);
	}
	root.appendChild(metrics);
	const canvas = el("canvas", "conceptedit-heatmap");
	root.appendChild(canvas);
	drawHeatmap(canvas, view.heatmap);
	return canvas;
}

const STYLE = `
.conceptedit-view { font: 11px sans-serif; color: #ddd; overflow: auto; box-sizing: border-box; }
.conceptedit-view .ce-body { display: flow-root; } /* its height holds its children's margins */
.conceptedit-view .ce-title { font-weight: bold; margin-bottom: 3px; }
.conceptedit-view .ce-chip { display: inline-block; background: #3a3f5a; border-radius: 8px; padding: 0 6px; margin: 0 3px 3px 0; }
.conceptedit-view .ce-muted, .conceptedit-view .ce-fingerprint { color: #999; margin-bottom: 3px; }
.conceptedit-view .ce-metrics td { padding: 0 6px 0 0; }
.conceptedit-view canvas { display: block; margin-top: 4px; }
`;

function ensureStyle() {
	if (document.getElementById("conceptedit-style")) return;
	const s = el("style", null, STYLE);
	s.id = "conceptedit-style";
	document.head.appendChild(s);
}

function showView(node, view) {
	ensureStyle();
	let widget = node.widgets?.find((w) => w.name === "conceptedit_view");
	if (!widget) {
		// the front end stretches the widget's element to the height it gives the widget: measure the
		// content in an inner element of its own height, or every redraw grows the node a little more
		const root = el("div", "conceptedit-view");
		const body = root.appendChild(el("div", "ce-body"));
		let contentHeight = 0; // last measured; 0 while the element is not laid out (off screen, hidden)
		const viewHeight = () => {
			contentHeight = body.offsetHeight || contentHeight;
			return (contentHeight || 200) + 24; // + the widget's 2 × 10 px margin
		};
		widget = node.addDOMWidget("conceptedit_view", "conceptedit_view", root, {
			serialize: false,
			hideOnZoom: false,
			getValue: () => undefined,
			setValue: () => {},
			// as tall as the content, no taller (newer front ends give a widget without a maximum all
			// the node's free space, then grow the node to fit that)
			getMinHeight: () => viewHeight(),
			getMaxHeight: () => viewHeight(),
		});
		widget.serialize = false; // keeps widgets_values (saved workflows) to the node's real inputs
	}
	const body = widget.element.querySelector(".ce-body");
	const canvas = renderView(body, view);
	// its height, measured before the front end has given the element the node's new width, must not
	// be that of text wrapped into a narrower box: lay it out at least as wide as the heat map
	body.style.minWidth = `${canvas.width}px`;
	node.conceptEditView = view;
	const need = [Math.max(node.size[0], canvas.width + 40), node.size[1]];
	node.setSize(need);
	// LiteGraph's computeSize(out) fills the array it is given: never pass it a width
	node.setSize(node.computeSize ? [need[0], Math.max(need[1], node.computeSize()[1])] : need);
	app.graph.setDirtyCanvas(true, true);
}

// ---- the concept preset dropdown ------------------------------------------------------------------
function conceptsInput(nodeData) {
	const spec = nodeData?.input?.required?.concepts ?? nodeData?.input?.optional?.concepts;
	return Array.isArray(spec) && spec[0] === "STRING" && spec[1]?.multiline;
}

function addPresetWidget(node, nodeData) {
	if (node.widgets?.find((w) => w.name === PRESET_WIDGET)) return;
	const target = node.widgets?.find((w) => w.name === "concepts");
	if (!target) return;
	// nodes whose list is "source -> destination" lines (EMCID) get "concept ->": map to nothing, i.e. erase
	const spec = nodeData.input.required?.concepts ?? nodeData.input.optional?.concepts;
	const arrows = String(spec[1]?.default ?? "").includes("->");
	const widget = node.addWidget("combo", PRESET_WIDGET, PRESET_PROMPT, (value) => {
		const list = CONCEPT_PRESETS[value];
		if (!list) return;
		target.value = list.map((c) => (arrows ? `${c} ->` : c)).join("\n");
		target.callback?.(target.value);
		widget.value = PRESET_PROMPT;
		app.graph.setDirtyCanvas(true, true);
	}, { values: [PRESET_PROMPT, ...Object.keys(CONCEPT_PRESETS)], serialize: false });
	widget.serialize = false;
}

app.registerExtension({
	name: "ConceptEdit.view",
	async beforeRegisterNodeDef(nodeType, nodeData) {
		if (nodeData.name === VIEW_NODE) {
			const onExecuted = nodeType.prototype.onExecuted;
			nodeType.prototype.onExecuted = function (message) {
				onExecuted?.apply(this, arguments);
				const view = message?.[UI_KEY]?.[0];
				if (view?.heatmap) showView(this, view);
			};
		}
	},
	nodeCreated(node) {
		const data = node.constructor?.nodeData;
		if (data?.category?.startsWith("ConceptEdit") && conceptsInput(data)) addPresetWidget(node, data);
	},
});
