#!/usr/bin/env node
// dynamo-generate: stream one generation from a dynamo-grpc router. The answer goes to stdout as it
// streams, then a newline; the completion's finish reason and usage go to stderr.
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { parseArgs } from "node:util";

import {
  FinishReasonSchema,
  GenerationParamsSchema,
  type Completion,
} from "./gen/dynamo_grpc/v1/common_pb.js";
import { describe, generate, routerClient } from "./router.js";

const USAGE = `usage: dynamo-generate [options] PROMPT
  --router HOST:PORT   router endpoint (127.0.0.1:50051)
  --model NAME         model name (tiny-llama)
  --max-tokens N       tokens to generate (32)
  --temperature T      sampling temperature, 0 = greedy (0)
  --ignore-eos         keep generating past the end-of-sequence token
  --request-id ID      request id (the router assigns one when empty)
  --cancel-after N     send a cancel once N tokens have arrived (0 = never)
  --timeout-s S        the request's deadline in seconds (0 = none)
  --token-ids          also print the generated token ids on stderr`;

/** How long past the request's deadline the call itself may last, for a router that never answers. */
const DEADLINE_GRACE_MS = 1000;

function options() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      router: { type: "string", default: "127.0.0.1:50051" },
      model: { type: "string", default: "tiny-llama" },
      "max-tokens": { type: "string", default: "32" },
      temperature: { type: "string", default: "0" },
      "ignore-eos": { type: "boolean", default: false },
      "request-id": { type: "string", default: "" },
      "cancel-after": { type: "string", default: "0" },
      "timeout-s": { type: "string", default: "0" },
      "token-ids": { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help || positionals.length !== 1) {
    console.error(USAGE);
    process.exit(2);
  }
  return {
    router: values.router,
    model: values.model,
    prompt: positionals[0],
    maxTokens: Number(values["max-tokens"]),
    temperature: Number(values.temperature),
    ignoreEos: values["ignore-eos"],
    requestId: values["request-id"],
    cancelAfter: Number(values["cancel-after"]),
    timeoutMs: Number(values["timeout-s"]) * 1000,
    tokenIds: values["token-ids"],
  };
}

async function main(): Promise<number> {
  const o = options();
  // With a timeout the request carries its deadline, so the router ends it with DEADLINE_EXCEEDED.
  const deadline = o.timeoutMs > 0 ? Date.now() + o.timeoutMs : undefined;
  const params = create(GenerationParamsSchema, {
    model: o.model,
    prompt: { form: { case: "text", value: o.prompt } },
    sampling: { maxTokens: o.maxTokens, temperature: o.temperature, ignoreEos: o.ignoreEos },
    deadline: deadline === undefined ? undefined : timestampFromMs(deadline),
  });
  const call = generate(routerClient(o.router), o.requestId, params,
                        deadline === undefined ? {} : { timeoutMs: o.timeoutMs + DEADLINE_GRACE_MS });
  const ids: number[] = [];
  let completion: Completion | undefined;
  try {
    for await (const response of call.responses) {
      if (response.event.case === "tokens") {
        process.stdout.write(response.event.value.text);
        ids.push(...response.event.value.tokenIds);
        if (o.cancelAfter > 0 && ids.length >= o.cancelAfter) {
          call.cancel();
        }
      } else if (response.event.case === "completion") {
        completion = response.event.value;
      }
    }
  } catch (error) {
    if (ids.length > 0) {
      process.stdout.write("\n");
    }
    console.error(`dynamo-generate: ${describe(error)}`);
    return 1;
  }
  process.stdout.write("\n");
  if (completion === undefined) {
    console.error("dynamo-generate: the router closed the stream without a completion");
    return 1;
  }
  if (o.tokenIds) {
    console.error(`token ids: ${ids.join(" ")}`);
  }
  const finish = FinishReasonSchema.value[completion.finishReason]?.name ?? String(completion.finishReason);
  const usage = completion.usage;
  console.error(`[${usage?.promptTokens ?? 0} prompt + ${usage?.completionTokens ?? 0} completion tokens, ` +
                `finish: ${finish}]`);
  return 0;
}

process.exitCode = await main();
