// RouterService.Generate over gRPC: one call per request, with the in-band cancel the protos define.
import { create } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type CallOptions, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import type { GenerationParams } from "./gen/dynamo_grpc/v1/common_pb.js";
import {
  GenerateRequestSchema,
  RouterService,
  type GenerateRequest,
  type GenerateResponse,
} from "./gen/dynamo_grpc/v1/router_pb.js";

export type RouterClient = Client<typeof RouterService>;

/** A client for the router at `endpoint` (host:port), speaking gRPC over plaintext HTTP/2. */
export function routerClient(endpoint: string): RouterClient {
  return createClient(RouterService, createGrpcTransport({ baseUrl: `http://${endpoint}` }));
}

/** One running request: iterate `responses` (token batches, then one completion); `cancel()` stops it. */
export interface GenerateCall {
  responses: AsyncIterable<GenerateResponse>;
  /** Sends the in-band cancel while the call runs; the stream then ends with FINISH_REASON_CANCELLED. */
  cancel(reason?: string): void;
}

/**
 * Opens a Generate call: the first message starts the request and the send side stays open, so that a
 * cancel can follow. Leaving a loop over `responses` early ends the call, which also stops the request.
 */
export function generate(client: RouterClient, requestId: string, params: GenerationParams,
                         options: CallOptions = {}): GenerateCall {
  let cancelReason: string | undefined;
  let wake = () => {};
  const woken = new Promise<void>((resolve) => (wake = resolve));
  let ended = false;

  async function* requests(): AsyncIterable<GenerateRequest> {
    yield create(GenerateRequestSchema, { requestId, action: { case: "start", value: params } });
    await woken;
    if (!ended && cancelReason !== undefined) {
      const cancel = { reason: cancelReason };
      yield create(GenerateRequestSchema, { requestId, action: { case: "cancel", value: cancel } });
    }
  }

  async function* responses(): AsyncIterable<GenerateResponse> {
    try {
      yield* client.generate(requests(), options);
    } finally {
      ended = true; // nothing more to send: let the request stream finish
      wake();
    }
  }

  return {
    responses: responses(),
    cancel(reason = "client cancel") {
      cancelReason ??= reason;
      wake();
    },
  };
}

/** A failed call in one line, `CODE REASON: message`, REASON being the ErrorInfo the server sent (left out
 *  when it only repeats the code). */
export function describe(error: unknown): string {
  const failure = ConnectError.from(error);
  const code = codeName(failure.code);
  const reason = errorInfoReason(failure);
  return `${code}${reason && reason !== code ? ` ${reason}` : ""}: ${failure.rawMessage}`;
}

/** The status code as the gRPC spec spells it (NOT_FOUND), not as Connect does (NotFound). */
function codeName(code: Code): string {
  return code === Code.Canceled ? "CANCELLED" : Code[code].replace(/(?<=.)([A-Z])/g, "_$1").toUpperCase();
}

/** google.rpc.ErrorInfo's `reason` (field 1), read off the wire: the protos do not include googleapis'. */
function errorInfoReason(error: ConnectError): string | undefined {
  for (const detail of error.details) {
    if (!("type" in detail) || detail.type !== "google.rpc.ErrorInfo") {
      continue;
    }
    const reader = new BinaryReader(detail.value);
    while (reader.pos < reader.len) {
      const [field, wireType] = reader.tag();
      if (field === 1 && wireType === WireType.LengthDelimited) {
        return reader.string();
      }
      reader.skip(wireType);
    }
  }
  return undefined;
}
