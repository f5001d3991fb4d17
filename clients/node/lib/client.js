'use strict';
// qwen-serve client for Node.js: loads the public proto at run time with @grpc/proto-loader (no generated
// code, no Python in between) and wraps the QwenServe service.
//
//   const { QwenClient } = require('qwen-serve-client');
//   const client = new QwenClient('127.0.0.1:50051');
//   for await (const event of client.generate({ prompt: 'Hello', stopping: { max_tokens: 16 } })) { ... }

const path = require('node:path');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The proto is the one in this repository (clients/node/lib -> proto/); QWEN_SERVE_PROTO overrides it for
// a copy installed elsewhere.
const DEFAULT_PROTO_PATH = path.resolve(__dirname, '..', '..', '..', 'proto', 'qwen_serve', 'v1', 'generate.proto');

// keepCase: field names exactly as in the proto (snake_case), as in every other language's stubs.
// longs as strings: uint64 seeds and nanosecond timings exceed 2^53. oneofs: each response carries
// `event: 'started' | 'token' | 'finished'`.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

function protoPath() {
  return process.env.QWEN_SERVE_PROTO || DEFAULT_PROTO_PATH;
}

function loadServiceDefinition(file = protoPath()) {
  if (!fs.existsSync(file)) {
    throw new Error(`proto file not found: ${file} (set QWEN_SERVE_PROTO)`);
  }
  const definition = protoLoader.loadSync(file, LOADER_OPTIONS);
  return grpc.loadPackageDefinition(definition).qwen_serve.v1.QwenServe;
}

function channelCredentials({ tls = false, rootCertPath } = {}) {
  if (!tls) return grpc.credentials.createInsecure();
  const rootCert = rootCertPath ? fs.readFileSync(rootCertPath) : undefined;
  return grpc.credentials.createSsl(rootCert);
}

class QwenClient {
  /**
   * @param {string} target host:port of the front-end
   * @param {{tls?: boolean, rootCertPath?: string, authToken?: string}} options
   */
  constructor(target, options = {}) {
    const Service = loadServiceDefinition();
    this.stub = new Service(target, channelCredentials(options));
    this.authToken = options.authToken;
  }

  metadata() {
    const metadata = new grpc.Metadata();
    if (this.authToken) metadata.set('authorization', `Bearer ${this.authToken}`);
    return metadata;
  }

  callOptions(timeoutSeconds) {
    return timeoutSeconds ? { deadline: Date.now() + timeoutSeconds * 1000 } : {};
  }

  /** Server stream of GenerateResponse objects; iterate with `for await`, cancel with `.cancel()`. */
  generate(request, { timeoutSeconds } = {}) {
    return this.stub.Generate(request, this.metadata(), this.callOptions(timeoutSeconds));
  }

  unary(method, request, timeoutSeconds) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata(), this.callOptions(timeoutSeconds), (error, response) =>
        (error ? reject(error) : resolve(response)));
    });
  }

  complete(request, options = {}) { return this.unary('Complete', request, options.timeoutSeconds); }
  tokenize(text) { return this.unary('Tokenize', { text }); }
  detokenize(ids) { return this.unary('Detokenize', { ids }); }
  modelInfo() { return this.unary('GetModelInfo', {}); }
  abort(requestId) { return this.unary('Abort', { request_id: requestId }); }

  /** Resolves when the channel is connected (or rejects after `seconds`). */
  waitForReady(seconds = 10) {
    return new Promise((resolve, reject) => {
      this.stub.waitForReady(Date.now() + seconds * 1000, (error) => (error ? reject(error) : resolve()));
    });
  }

  close() { this.stub.close(); }
}

module.exports = { QwenClient, loadServiceDefinition, DEFAULT_PROTO_PATH, LOADER_OPTIONS, grpc };
