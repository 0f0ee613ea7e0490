// Runs an ONNX model in onnxruntime-web (its wasm backend, as a browser page would) under node.
// usage: node ort_web_run.mjs ORT_WEB_DIR MODEL.onnx INPUTS.json OUTPUTS.json
// INPUTS.json: {name: {"dims": [...], "data": [...]}} (float32); OUTPUTS.json gets the same shape.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [ortDir, modelPath, inputsPath, outputsPath] = process.argv.slice(2);
const ort = await import(pathToFileURL(join(ortDir, "dist", "ort.wasm.min.mjs")).href);
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = pathToFileURL(join(ortDir, "dist") + "/").href;
const session = await ort.InferenceSession.create(readFileSync(modelPath), { executionProviders: ["wasm"] });
const feeds = {};
for (const [name, t] of Object.entries(JSON.parse(readFileSync(inputsPath, "utf8")))) {
  feeds[name] = new ort.Tensor("float32", Float32Array.from(t.data), t.dims);
}
const results = await session.run(feeds);
const out = {};
for (const [name, t] of Object.entries(results)) out[name] = { dims: t.dims, data: Array.from(t.data) };
writeFileSync(outputsPath, JSON.stringify(out));
