'use strict';
// Command line of qwen-node-client -> a GenerateRequest object shaped like the proto (snake_case).
// Only flags the user gave are set, so proto3 `optional` fields stay absent (absent != 0 for temperature).

const { parseArgs } = require('node:util');

const USAGE = `usage: qwen-node-client <command> [options]

commands:
  generate <prompt>      stream a completion of the raw prompt (no chat template)
  chat <message>         stream the assistant's answer to one user message (model's chat template)
  tokenize <text>        print token ids
  info                   print the model info as JSON

options:
  --target HOST:PORT     server address (default $QWEN_CLIENT_TARGET or 127.0.0.1:50051)
  --system TEXT          system message for chat
  --max-tokens N         most tokens to generate
  --temperature T        0 = greedy; range [0, 2]
  --top-k K  --top-p P  --min-p P
  --repetition-penalty R  --presence-penalty P  --frequency-penalty F
  --seed S               RNG seed (uint64) for reproducible sampling
  --stop TEXT            stop string (repeatable, up to 8)
  --ignore-eos           keep going past end-of-sequence
  --logprobs N           also return log-probabilities with N alternatives (0..20)
  --json                 one JSON object per stream event instead of text
  --timeout SECONDS      gRPC deadline
  --tls  --ca FILE       TLS, optionally with a root certificate
  --token TOKEN          bearer token (default $QWEN_CLIENT_TOKEN)
  -h, --help`;

const OPTIONS = {
  target: { type: 'string' },
  system: { type: 'string' },
  'max-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-k': { type: 'string' },
  'top-p': { type: 'string' },
  'min-p': { type: 'string' },
  'repetition-penalty': { type: 'string' },
  'presence-penalty': { type: 'string' },
  'frequency-penalty': { type: 'string' },
  seed: { type: 'string' },
  stop: { type: 'string', multiple: true },
  'ignore-eos': { type: 'boolean' },
  logprobs: { type: 'string' },
  json: { type: 'boolean' },
  timeout: { type: 'string' },
  tls: { type: 'boolean' },
  ca: { type: 'string' },
  token: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
};

// flag -> [section of GenerateRequest, proto field, parser]
const SAMPLING_FLAGS = {
  temperature: ['temperature', Number],
  'top-k': ['top_k', parseInteger],
  'top-p': ['top_p', Number],
  'min-p': ['min_p', Number],
  'repetition-penalty': ['repetition_penalty', Number],
  'presence-penalty': ['presence_penalty', Number],
  'frequency-penalty': ['frequency_penalty', Number],
};

class UsageError extends Error {}

function parseInteger(text, flag) {
  if (!/^\d+$/.test(text)) throw new UsageError(`--${flag} must be a non-negative integer, got '${text}'`);
  return Number.parseInt(text, 10);
}

function parseNumber(parser, text, flag) {
  const value = parser === parseInteger ? parseInteger(text, flag) : Number(text);
  if (!Number.isFinite(value)) throw new UsageError(`--${flag} must be a number, got '${text}'`);
  return value;
}

function buildInput(command, text, values) {
  if (command === 'generate') return { prompt: text };
  const messages = [];
  if (values.system !== undefined) messages.push({ role: 'system', content: values.system });
  messages.push({ role: 'user', content: text });
  return { chat: { messages, add_generation_prompt: true } };
}

function buildGenerateRequest(command, text, values) {
  const sampling = {};
  for (const [flag, [field, parser]] of Object.entries(SAMPLING_FLAGS)) {
    if (values[flag] !== undefined) sampling[field] = parseNumber(parser, values[flag], flag);
  }
  if (values.seed !== undefined) {
    if (!/^\d+$/.test(values.seed)) throw new UsageError(`--seed must be a uint64, got '${values.seed}'`);
    sampling.seed = values.seed; // a string: uint64 does not fit a JS number
  }
  const stopping = { stop: values.stop || [], ignore_eos: Boolean(values['ignore-eos']) };
  if (values['max-tokens'] !== undefined) {
    stopping.max_tokens = parseInteger(values['max-tokens'], 'max-tokens');
  }
  const request = { ...buildInput(command, text, values), sampling, stopping };
  if (values.logprobs !== undefined) {
    request.logprobs = true;
    request.top_logprobs = parseInteger(values.logprobs, 'logprobs');
  }
  return request;
}

/** argv (without node and script) -> { command, text, values, request? } or throws UsageError. */
function parseCommandLine(argv) {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (error) {
    throw new UsageError(error.message);
  }
  const { values, positionals } = parsed;
  if (values.help) return { command: 'help', values };
  const [command, ...rest] = positionals;
  const needsText = ['generate', 'chat', 'tokenize'].includes(command);
  if (!['generate', 'chat', 'tokenize', 'info'].includes(command)) {
    throw new UsageError(`unknown command '${command ?? ''}'`);
  }
  if (needsText && rest.length !== 1) throw new UsageError(`${command} takes exactly one text argument`);
  const text = rest[0];
  const result = { command, text, values };
  if (command === 'generate' || command === 'chat') result.request = buildGenerateRequest(command, text, values);
  return result;
}

module.exports = { parseCommandLine, buildGenerateRequest, UsageError, USAGE };
