'use strict';
/**
 * A small Node.js client for the reranker.v1.Reranker gRPC service.
 *
 * The contract is loaded at run time from ../../proto/reranker/v1/reranker.proto
 * (no generated code). Field names are camelCase (proto-loader `keepCase: false`):
 * `topN`, `returnDocuments`, `requestId`, `usage.truncatedDocuments`. 64-bit
 * integers (`usage.tokens`, durations' `seconds`) come back as JavaScript numbers,
 * enums as their names (`'PRECISION_FP32'`), and every field is present with its
 * default value.
 *
 *   const { RerankerClient } = require('./index');
 *   const client = new RerankerClient('localhost:50051', { token: process.env.RERANKER_TOKEN });
 *   const ranking = await client.rerank('what is the capital of France?', ['Paris is...', 'Berlin is...']);
 *   for (const result of ranking.results) console.log(result.index, result.score);
 *   client.close();
 *
 * Every call has a deadline (`timeoutMs`, default 30 s). UNAVAILABLE and
 * RESOURCE_EXHAUSTED are retried by gRPC itself (the channel's service config,
 * `maxAttempts` per call, 3 by default; 1 turns retries off), as in the Python
 * client. Scoring is idempotent, so retries are safe. A call that fails rejects
 * with a RerankerError carrying the status code and the server's message.
 */

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'reranker/v1/reranker.proto';
const SERVICE = 'reranker.v1.Reranker';
const RETRYABLE = ['UNAVAILABLE', 'RESOURCE_EXHAUSTED'];

/** proto-loader options, one set for the whole client. */
const LOADER_OPTIONS = {
  keepCase: false, // camelCase field names
  longs: Number, // uint64 / int64 as numbers (exact below 2^53)
  enums: String, // enum values by name
  defaults: true, // unset fields carry their default
  oneofs: true, // RerankStreamResponse.event says 'scored' or 'final'
  includeDirs: [PROTO_ROOT], // google/protobuf/*.proto (well-known types) are built into protobufjs
};

let cachedPackage = null;

/** The loaded `reranker.v1` package (the service constructor), loaded once. */
function loadPackage() {
  if (!cachedPackage) {
    const definition = protoLoader.loadSync(path.join(PROTO_ROOT, PROTO_FILE), LOADER_OPTIONS);
    cachedPackage = grpc.loadPackageDefinition(definition).reranker.v1;
  }
  return cachedPackage;
}

/** A call that ended with a status other than OK. */
class RerankerError extends Error {
  constructor(code, details) {
    const codeName = grpc.status[code] || String(code);
    super(`${codeName}: ${details}`);
    this.name = 'RerankerError';
    this.code = code; // numeric gRPC status code, e.g. 3
    this.codeName = codeName; // its name, e.g. 'INVALID_ARGUMENT'
    this.details = details; // the server's message
  }

  static from(error) {
    if (error instanceof RerankerError) return error;
    return new RerankerError(error.code ?? grpc.status.UNKNOWN, error.details ?? error.message);
  }
}

/** The gRPC service config: retries of UNAVAILABLE and RESOURCE_EXHAUSTED, throttled. */
function serviceConfig(maxAttempts) {
  const config = { loadBalancingConfig: [{ round_robin: {} }] };
  if (maxAttempts > 1) {
    config.methodConfig = [
      {
        name: [{ service: SERVICE }],
        retryPolicy: {
          maxAttempts,
          initialBackoff: '0.1s',
          maxBackoff: '2s',
          backoffMultiplier: 2,
          retryableStatusCodes: RETRYABLE,
        },
      },
    ];
    // Stop retrying when most calls fail: retries must not amplify an overload.
    // 100 tokens, as in the Python client (service/client.py says why).
    config.retryThrottling = { maxTokens: 100, tokenRatio: 0.1 };
  }
  return JSON.stringify(config);
}

class RerankerClient {
  /**
   * @param {string} target host:port, or a gRPC name such as dns:///reranker:50051
   * @param {object} [options]
   * @param {number} [options.timeoutMs=30000] deadline of every call that does not name its own
   * @param {number} [options.maxAttempts=3] attempts per call, the first included; 1 turns retries off
   * @param {string} [options.token] bearer token, sent as `authorization: Bearer <token>`
   * @param {boolean} [options.tls=false] use TLS (system roots, or `rootCertificates`)
   * @param {Buffer} [options.rootCertificates] PEM CA bundle to trust
   * @param {Buffer} [options.privateKey] PEM client key, for mutual TLS
   * @param {Buffer} [options.certificateChain] PEM client certificate, for mutual TLS
   * @param {number} [options.maxMessageBytes=67108864] largest message sent or received
   */
  constructor(target = 'localhost:50051', options = {}) {
    const {
      timeoutMs = 30000,
      maxAttempts = 3,
      token = '',
      tls = false,
      rootCertificates = null,
      privateKey = null,
      certificateChain = null,
      maxMessageBytes = 64 * 1024 * 1024,
    } = options;
    this.timeoutMs = timeoutMs;
    this.token = token;
    const credentials = tls || rootCertificates
      ? grpc.credentials.createSsl(rootCertificates, privateKey, certificateChain)
      : grpc.credentials.createInsecure();
    const Reranker = loadPackage().Reranker;
    this.stub = new Reranker(target, credentials, {
      'grpc.service_config': serviceConfig(maxAttempts),
      'grpc.enable_retries': maxAttempts > 1 ? 1 : 0,
      'grpc.max_receive_message_length': maxMessageBytes,
      'grpc.max_send_message_length': maxMessageBytes,
    });
  }

  close() {
    this.stub.close();
  }

  _metadata() {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    return metadata;
  }

  _callOptions(timeoutMs) {
    return { deadline: new Date(Date.now() + (timeoutMs ?? this.timeoutMs)) };
  }

  _unary(method, request, timeoutMs) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this._metadata(), this._callOptions(timeoutMs), (error, response) => {
        if (error) reject(RerankerError.from(error));
        else resolve(response);
      });
    });
  }

  /**
   * Rank `documents` for `query`, best first.
   * @param {string} query
   * @param {string[]} documents
   * @param {object} [options] instruction, topN, returnDocuments, requestId,
   *   priority ('PRIORITY_INTERACTIVE' | 'PRIORITY_BATCH'), truncation
   *   ('TRUNCATION_END' | 'TRUNCATION_NONE'), maxTokensPerDoc, timeoutMs
   * @returns {Promise<object>} RerankResponse: { requestId, results: [{ index, score, logit, document, truncated, tokens }], usage, timing }
   */
  rerank(query, documents, options = {}) {
    const { timeoutMs, ...fields } = options;
    return this._unary('Rerank', rerankRequest(query, documents, fields), timeoutMs);
  }

  /**
   * The same ranking as a stream: `{ event: 'scored', scored: { results } }` per
   * completed batch, then one `{ event: 'final', final: RerankResponse }`.
   * Leaving a `for await` loop early cancels the call, and the server drops the
   * request's queued work.
   * @returns {AsyncGenerator<object>} RerankStreamResponse messages
   */
  async *rerankStream(query, documents, options = {}) {
    const { timeoutMs, ...fields } = options;
    const call = this.stub.RerankStream(rerankRequest(query, documents, fields), this._metadata(), this._callOptions(timeoutMs));
    let finished = false;
    try {
      for await (const message of call) yield message;
      finished = true;
    } catch (error) {
      finished = true;
      throw RerankerError.from(error);
    } finally {
      if (!finished) call.cancel();
    }
  }

  /**
   * Score explicit (query, document) pairs, in input order.
   * @param {Array<[string, string]|{query: string, document: string}>} pairs
   * @param {object} [options] instruction, requestId, priority, truncation, maxTokensPerDoc, timeoutMs
   * @returns {Promise<object>} ScoreResponse: { requestId, results, usage, timing }
   */
  score(pairs, options = {}) {
    const { timeoutMs, ...fields } = options;
    const request = {
      ...fields,
      pairs: pairs.map((pair) => (Array.isArray(pair) ? { query: pair[0], document: pair[1] } : pair)),
    };
    return this._unary('Score', request, timeoutMs);
  }

  /**
   * The loaded model and the server's limits.
   * @returns {Promise<object>} ModelInfo: { modelId, revision, precision, devices, limits, defaultInstruction, serverVersion, modelMemoryBytes }
   */
  modelInfo(options = {}) {
    return this._unary('GetModelInfo', {}, options.timeoutMs);
  }
}

function rerankRequest(query, documents, fields = {}) {
  return { ...fields, query, documents: Array.from(documents) };
}

/** A google.protobuf.Duration as loaded here ({ seconds, nanos }) in seconds. */
function durationSeconds(duration) {
  return duration ? Number(duration.seconds) + duration.nanos / 1e9 : 0;
}

module.exports = { RerankerClient, RerankerError, loadPackage, durationSeconds, PROTO_ROOT, LOADER_OPTIONS };
