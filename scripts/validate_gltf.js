// Validates glTF/GLB files with the Khronos glTF validator (npm package gltf-validator).
//   node scripts/validate_gltf.js FILE.glb [FILE2.glb ...]
// Prints one JSON line per file: {"file", "errors", "warnings", "infos", "hints", "messages" (first 20)};
// exits 1 when any file has an error. The package is found through NODE_PATH (scripts/install_gltf_validator.sh
// installs it into .cache/gltf-validator/node_modules).
"use strict";
const fs = require("fs");
const validator = require("gltf-validator");

async function main(files) {
  let failed = false;
  for (const file of files) {
    const report = await validator.validateBytes(new Uint8Array(fs.readFileSync(file)), { uri: file, maxIssues: 200 });
    const issues = report.issues;
    failed = failed || issues.numErrors > 0;
    console.log(JSON.stringify({
      file, errors: issues.numErrors, warnings: issues.numWarnings, infos: issues.numInfos, hints: issues.numHints,
      messages: issues.messages.slice(0, 20).map((m) => `${m.severity} ${m.code} ${m.pointer || ""} ${m.message}`),
      triangles: report.info ? report.info.totalTriangleCount : null,
      vertices: report.info ? report.info.totalVertexCount : null,
    }));
  }
  process.exit(failed ? 1 : 0);
}

if (process.argv.length < 3) {
  console.error("usage: node scripts/validate_gltf.js FILE.glb [FILE2.glb ...]");
  process.exit(2);
}
main(process.argv.slice(2)).catch((e) => { console.error(`validate_gltf: ${e}`); process.exit(2); });
