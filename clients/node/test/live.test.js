'use strict';
// Against a running qwen-serve (QWEN_CLIENT_TARGET=host:port, QWEN_CLIENT_TOKEN if it wants one; skipped
// without a target): the stream has the
// documented shape and its text equals the unary Complete of the same greedy request.

const test = require('node:test');
const assert = require('node:assert/strict');
const { QwenClient } = require('../lib/client');

const target = process.env.QWEN_CLIENT_TARGET;
const options = { authToken: process.env.QWEN_CLIENT_TOKEN };
const skip = target ? false : 'QWEN_CLIENT_TARGET not set';
const REQUEST = {
  prompt: 'The capital of France is',
  sampling: { temperature: 0 },
  stopping: { max_tokens: 12, ignore_eos: true },
};

test('Generate streams started, tokens, finished; text equals Complete', { skip }, async () => {
  const client = new QwenClient(target, options);
  try {
    await client.waitForReady(10);
    const events = [];
    for await (const response of client.generate(REQUEST, { timeoutSeconds: 60 })) events.push(response);
    assert.equal(events[0].event, 'started');
    assert.equal(events.at(-1).event, 'finished');
    const tokens = events.slice(1, -1);
    assert.ok(tokens.every((e) => e.event === 'token'));
    const ids = tokens.flatMap((e) => e.token.token_ids);
    const finished = events.at(-1).finished;
    assert.equal(finished.reason, 'FINISH_REASON_LENGTH');
    assert.equal(finished.usage.completion_tokens, 12);
    assert.equal(ids.length, 12);
    assert.equal(finished.usage.prompt_tokens, events[0].started.prompt_tokens);

    const complete = await client.complete(REQUEST, { timeoutSeconds: 60 });
    assert.deepEqual(complete.token_ids, ids);
    assert.equal(complete.text, tokens.map((e) => e.token.text).join(''));
  } finally {
    client.close();
  }
});

test('an invalid request fails with INVALID_ARGUMENT naming the field', { skip }, async () => {
  const client = new QwenClient(target, options);
  try {
    const bad = { ...REQUEST, sampling: { temperature: 5 } };
    await assert.rejects(client.complete(bad), (error) => error.code === 3 && /temperature/.test(error.details));
  } finally {
    client.close();
  }
});
