'use strict';
// Offline tests: the command line becomes the GenerateRequest the proto expects, and that request
// survives a protobuf round trip with proto3 `optional` presence intact (temperature 0 != absent).

const test = require('node:test');
const assert = require('node:assert/strict');
const protoLoader = require('@grpc/proto-loader');
const { parseCommandLine, UsageError } = require('../lib/args');
const { DEFAULT_PROTO_PATH, LOADER_OPTIONS } = require('../lib/client');

function roundTrip(request) {
  const definition = protoLoader.loadSync(DEFAULT_PROTO_PATH, LOADER_OPTIONS);
  const method = definition['qwen_serve.v1.QwenServe'].Generate;
  return method.requestDeserialize(method.requestSerialize(request));
}

test('generate flags map onto sampling and stopping fields', () => {
  const { request } = parseCommandLine([
    'generate', 'Hello', '--max-tokens', '12', '--temperature', '0', '--top-k', '40',
    '--seed', '18446744073709551615', '--stop', 'a', '--stop', '\n\n', '--logprobs', '3',
  ]);
  assert.deepEqual(request, {
    prompt: 'Hello',
    sampling: { temperature: 0, top_k: 40, seed: '18446744073709551615' },
    stopping: { stop: ['a', '\n\n'], ignore_eos: false, max_tokens: 12 },
    logprobs: true,
    top_logprobs: 3,
  });
});

test('explicit temperature 0 survives serialization; an absent one stays absent', () => {
  const greedy = roundTrip(parseCommandLine(['generate', 'x', '--temperature', '0']).request);
  assert.equal(greedy.sampling.temperature, 0);
  assert.equal(greedy.sampling._temperature, 'temperature'); // synthetic oneof of a proto3 optional
  const unset = roundTrip(parseCommandLine(['generate', 'x']).request);
  assert.equal(unset.sampling._temperature, undefined);
  assert.equal(unset.input, 'prompt');
});

test('uint64 seed keeps all 64 bits through the wire', () => {
  const decoded = roundTrip(parseCommandLine(['generate', 'x', '--seed', '18446744073709551615']).request);
  assert.equal(decoded.sampling.seed, '18446744073709551615');
});

test('chat builds system + user messages with the generation prompt', () => {
  const { request } = parseCommandLine(['chat', 'Hi', '--system', 'Be brief']);
  assert.deepEqual(request.chat, {
    messages: [{ role: 'system', content: 'Be brief' }, { role: 'user', content: 'Hi' }],
    add_generation_prompt: true,
  });
});

test('bad command lines raise UsageError', () => {
  const bad = [
    [], ['fly'], ['generate'], ['generate', 'a', 'b'], ['generate', 'a', '--top-k', '-1'],
    ['generate', 'a', '--temperature', 'hot'], ['generate', 'a', '--seed', '-5'], ['generate', 'a', '--nope'],
  ];
  for (const argv of bad) assert.throws(() => parseCommandLine(argv), UsageError, argv.join(' '));
});
