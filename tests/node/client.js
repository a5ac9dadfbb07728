#!/usr/bin/env node
// A second-language client of facegallery.v1.GalleryService (issue 9), run by
// tests/test_node_client.py. Over TLS, with an API key, it
//   1. enrolls a photo (with a request_id, the idempotency key),
//   2. identifies the same photo (and, with --stranger, a photo of someone not enrolled),
//   3. enrolls a photo without a face and reads the google.rpc.ErrorInfo reason ("NO_FACE") from
//      the error's `grpc-status-details-bin` trailer,
// and prints one JSON object per step on stdout.
//
// Usage:
//   FACEGALLERY_API_KEY=fg_... node client.js --address 127.0.0.1:50051 --ca ca.pem \
//     --proto-dir ../../proto --include SITE_PACKAGES --identity ann --photo ann.jpg --no-face cat.png \
//     [--stranger bob.jpg]
// --include: a directory holding google/rpc/status.proto (e.g. the Python
// googleapis-common-protos package's site-packages directory); repeatable.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const DEADLINE_MS = 60_000;
const ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo";

const { values: args } = parseArgs({
  options: {
    address: { type: "string" },
    ca: { type: "string" },
    "proto-dir": { type: "string" },
    include: { type: "string", multiple: true, default: [] },
    gallery: { type: "string", default: "default" },
    identity: { type: "string" },
    photo: { type: "string" },
    "no-face": { type: "string" },
    stranger: { type: "string" },
  },
});
const apiKey = process.env.FACEGALLERY_API_KEY;
for (const name of ["address", "ca", "proto-dir", "identity", "photo", "no-face"]) {
  if (!args[name]) usage(`--${name} is required`);
}
if (!apiKey) usage("set FACEGALLERY_API_KEY");
const includeDirs = [args["proto-dir"], ...args.include];

function usage(problem) {
  console.error(`client.js: ${problem} (see the usage at the top of client.js)`);
  process.exit(2);
}

// The service, with field names as in the .proto (keepCase), enums as names, and `oneofs` so
// that each oneof, including the synthetic one of a proto3 `optional` field (`_identity_id`),
// names the member that is set. An unset `optional` field is absent from the object.
const definition = protoLoader.loadSync("facegallery/v1/gallery_service.proto", {
  includeDirs,
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { GalleryService } = grpc.loadPackageDefinition(definition).facegallery.v1;

// google.rpc.Status and its ErrorInfo detail, decoded with protobufjs (proto-loader's own parser).
function loadRpcTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => includeDirs.map((dir) => path.join(dir, target)).find((p) => fs.existsSync(p)) ?? target;
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
  return { Status: root.lookupType("google.rpc.Status"), ErrorInfo: root.lookupType("google.rpc.ErrorInfo") };
}
const { Status, ErrorInfo } = loadRpcTypes();

// TLS with the server's CA; the API key rides on every call as `authorization: Bearer KEY`.
const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${apiKey}`);
  callback(null, metadata);
});
const credentials = grpc.credentials.combineChannelCredentials(grpc.credentials.createSsl(fs.readFileSync(args.ca)), bearer);
const client = new GalleryService(args.address, credentials);

function call(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// The ErrorInfo of a failed call, from the google.rpc.Status in its trailing metadata; null if none.
function errorInfo(error) {
  const [details] = error.metadata ? error.metadata.get("grpc-status-details-bin") : [];
  if (!details) return null;
  const status = Status.decode(details);
  const any = status.details.find((detail) => detail.type_url === ERROR_INFO_TYPE);
  return any ? ErrorInfo.toObject(ErrorInfo.decode(any.value)) : null;
}

// One identified face; a field the server left unset (unknown face, empty gallery) is null.
function identification(face) {
  const present = (field) => face[`_${field}`] === field;
  return {
    box: face.face.box,
    identity_id: present("identity_id") ? face.identity_id : null,
    distance: present("distance") ? face.distance : null,
    score: present("score") ? face.score : null,
    threshold: face.threshold,
    score_kind: face.score_kind,
    estimated_fpir: present("estimated_fpir") ? face.estimated_fpir : null,
  };
}

function print(step, result) {
  console.log(JSON.stringify({ step, ...result }));
}

async function main() {
  const photo = { data: fs.readFileSync(args.photo) };
  const enrolled = await call("Enroll", {
    gallery: args.gallery,
    identity_id: args.identity,
    image: photo,
    request_id: crypto.randomUUID(),
  });
  print("enroll", { identity_id: enrolled.identity_id, template_id: enrolled.template_id, identity_created: enrolled.identity_created });

  const identified = await call("Identify", { gallery: args.gallery, image: photo });
  print("identify", { faces: identified.faces.map(identification) });
  if (args.stranger) {
    const stranger = await call("Identify", { gallery: args.gallery, image: { data: fs.readFileSync(args.stranger) } });
    print("identify_stranger", { faces: stranger.faces.map(identification) });
  }

  try {
    await call("Enroll", { gallery: args.gallery, identity_id: args.identity, image: { data: fs.readFileSync(args["no-face"]) } });
    print("enroll_no_face", { code: "OK" });
  } catch (error) {
    const info = errorInfo(error);
    print("enroll_no_face", {
      code: grpc.status[error.code],
      message: error.details,
      reason: info ? info.reason : null,
      domain: info ? info.domain : null,
    });
  }
}

main()
  .catch((error) => {
    console.error(`client.js: ${error.stack || error}`);
    process.exitCode = 1;
  })
  .finally(() => client.close());
