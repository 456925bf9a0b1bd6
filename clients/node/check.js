#!/usr/bin/env node
'use strict';
/**
 * Exercise a live Reranker service from Node and print what it answered, as JSON.
 *
 *   node check.js --target localhost:50051 --input inputs.json [--token T] [--timeout-ms 30000]
 *
 * inputs.json:
 *   {
 *     "query": "what is the capital of France?",
 *     "documents": ["Paris is ...", "Berlin is ..."],
 *     "instruction": "",            optional
 *     "topN": 0,                    optional
 *     "pairs": [["q", "d"], ...],   optional: also call Score with these
 *     "invalid": {"query": "", "documents": ["a"]}   optional: a request expected to fail
 *   }
 *
 * Output (stdout), one JSON object:
 *   rerank:    the RerankResponse
 *   stream:    { events: ['scored', ..., 'final'], partials: [[index, ...], ...],
 *                scored: [{index, score, logit, ...}], final: RerankResponse }
 *   score:     the ScoreResponse (when `pairs` was given)
 *   modelInfo: the ModelInfo
 *   invalid:   { code, codeName, details } of the failed call (when `invalid` was given)
 *
 * Exits 0 when every call that should succeed did; otherwise prints
 * { error: { code, codeName, details } } and exits 1. Usage errors exit 2.
 */

const fs = require('fs');
const { RerankerClient, RerankerError } = require('./index');

function parseArguments(argv) {
  const args = { target: 'localhost:50051', input: '', token: '', timeoutMs: 30000 };
  for (let i = 0; i < argv.length; i += 1) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === '--target') args.target = value;
    else if (flag === '--input') args.input = value;
    else if (flag === '--token') args.token = value;
    else if (flag === '--timeout-ms') args.timeoutMs = Number(value);
    else throw new Error(`unknown argument ${flag}`);
    i += 1;
  }
  if (!args.input) throw new Error('--input FILE is required');
  if (!(args.timeoutMs > 0)) throw new Error('--timeout-ms must be a positive number');
  return args;
}

async function check(client, inputs) {
  const fields = { instruction: inputs.instruction || '', topN: inputs.topN || 0 };
  const out = {};
  out.rerank = await client.rerank(inputs.query, inputs.documents, fields);

  const stream = { events: [], partials: [], scored: [], final: null };
  for await (const message of client.rerankStream(inputs.query, inputs.documents, fields)) {
    stream.events.push(message.event);
    if (message.event === 'scored') {
      stream.partials.push(message.scored.results.map((result) => result.index));
      stream.scored.push(...message.scored.results);
    } else {
      stream.final = message.final;
    }
  }
  out.stream = stream;

  if (inputs.pairs) out.score = await client.score(inputs.pairs, { instruction: fields.instruction });
  out.modelInfo = await client.modelInfo();

  if (inputs.invalid) {
    try {
      await client.rerank(inputs.invalid.query, inputs.invalid.documents || []);
      out.invalid = null; // it should have failed; the caller sees null
    } catch (error) {
      if (!(error instanceof RerankerError)) throw error;
      out.invalid = { code: error.code, codeName: error.codeName, details: error.details };
    }
  }
  return out;
}

async function main() {
  let args;
  try {
    args = parseArguments(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`usage: node check.js --target HOST:PORT --input FILE [--token T] [--timeout-ms N]\n${error.message}\n`);
    return 2;
  }
  const inputs = JSON.parse(fs.readFileSync(args.input, 'utf8'));
  const client = new RerankerClient(args.target, { token: args.token, timeoutMs: args.timeoutMs });
  try {
    process.stdout.write(`${JSON.stringify(await check(client, inputs))}\n`);
    return 0;
  } catch (error) {
    const failure = RerankerError.from(error);
    process.stdout.write(`${JSON.stringify({ error: { code: failure.code, codeName: failure.codeName, details: failure.details } })}\n`);
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => {
  process.exitCode = code;
});
