// gRPC Node's own xDS client (@grpc/grpc-js with @grpc/grpc-js-xds), dialing
// services through the registry. Driven by testkit/tests/xds.rs.
// GRPC_XDS_BOOTSTRAP names the bootstrap file (the registry as the xDS server).
//
// Usage: node xds_client.js PROTO_DIR
// Reads one command per line on stdin, answers one `xds-result {json}` line:
//   calc N         N Calculator/Add calls over xds:///calculator, counted by peer
'use strict';

const path = require('path');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
require('@grpc/grpc-js-xds').register();

const protoDir = process.argv[2];
const definition = protoLoader.loadSync(path.join(protoDir, 'calculator/v1/calculator.proto'), {
  includeDirs: [protoDir],
});
const { Calculator } = grpc.loadPackageDefinition(definition).calculator.v1;

const answer = (value) => console.log('xds-result ' + JSON.stringify(value));
const deadline = () => new Date(Date.now() + 5000);

function add(client, a, b) {
  return new Promise((resolve) => {
    const call = client.Add({ a, b }, { deadline: deadline() }, (error, reply) => {
      resolve({ error, reply, peer: call.getPeer() });
    });
  });
}

const calculator = new Calculator('xds:///calculator', grpc.credentials.createInsecure());

async function run(words) {
  const [cmd, ...args] = words;
  if (cmd === 'calc') {
    let ok = 0;
    const errors = [];
    const peers = {};
    for (let i = 0; i < Number(args[0]); i++) {
      const { error, reply, peer } = await add(calculator, i, 2);
      if (error) {
        errors.push(`${error.code}: ${error.details}`);
      } else if (reply.value === i + 2) {
        ok++;
        peers[peer] = (peers[peer] || 0) + 1;
      }
    }
    answer({ ok, failed: errors.length, errors: errors.slice(0, 3), peers });
  } else {
    answer({ error: `unknown command ${cmd}` });
  }
}

answer({ ready: true });
const lines = readline.createInterface({ input: process.stdin });
let queue = Promise.resolve();
lines.on('line', (line) => {
  const words = line.trim().split(/\s+/).filter(Boolean);
  if (words.length > 0) {
    queue = queue.then(() => run(words));
  }
});
lines.on('close', () => queue.then(() => process.exit(0)));
