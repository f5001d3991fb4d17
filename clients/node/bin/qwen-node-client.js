#!/usr/bin/env node
'use strict';
// qwen-node-client: stream a generation from qwen-serve to the terminal (text as it arrives, or --json
// for one JSON object per event). Exit codes: 0 ok, 1 gRPC error (status name on stderr), 2 usage.

const { QwenClient, grpc } = require('../lib/client');
const { parseCommandLine, UsageError, USAGE } = require('../lib/args');

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

function describeFinished(finished) {
  const usage = finished.usage || {};
  const ttftSeconds = Number((finished.timings || {}).time_to_first_token_ns || 0) / 1e9;
  const reason = String(finished.reason).replace('FINISH_REASON_', '').toLowerCase();
  return `[${reason}: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens, ` +
    `first token after ${ttftSeconds.toFixed(3)} s]`;
}

async function streamGeneration(client, request, values) {
  const call = client.generate(request, { timeoutSeconds: Number(values.timeout) || undefined });
  process.once('SIGINT', () => call.cancel()); // Ctrl-C: the server aborts the request within one step
  for await (const response of call) {
    if (values.json) {
      process.stdout.write(`${JSON.stringify(response)}\n`);
    } else if (response.event === 'token') {
      process.stdout.write(response.token.text);
    } else if (response.event === 'finished') {
      process.stdout.write('\n');
      process.stderr.write(`${describeFinished(response.finished)}\n`);
    }
  }
}

async function run(parsed) {
  const { command, values } = parsed;
  const target = values.target || process.env.QWEN_CLIENT_TARGET || '127.0.0.1:50051';
  const client = new QwenClient(target, {
    tls: Boolean(values.tls || values.ca),
    rootCertPath: values.ca,
    authToken: values.token || process.env.QWEN_CLIENT_TOKEN,
  });
  try {
    if (command === 'info') {
      process.stdout.write(`${JSON.stringify(await client.modelInfo(), null, 2)}\n`);
    } else if (command === 'tokenize') {
      const response = await client.tokenize(parsed.text);
      process.stdout.write(`${JSON.stringify(response.ids)}\n`);
    } else {
      await streamGeneration(client, parsed.request, values);
    }
  } finally {
    client.close();
  }
}

async function main(argv) {
  let parsed;
  try {
    parsed = parseCommandLine(argv);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    process.stderr.write(`qwen-node-client: ${error.message}\n\n${USAGE}\n`);
    return 2;
  }
  if (parsed.command === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  try {
    await run(parsed);
    return 0;
  } catch (error) {
    if (error.code === undefined) throw error;
    process.stderr.write(`qwen-node-client: ${STATUS_NAMES[error.code] || error.code}: ${error.details}\n`);
    return 1;
  }
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
