// A thin client over the generated grpc-js stub (gen/, built from proto/ by
// `npm run build`): one deadline per call, retries of UNAVAILABLE by gRPC itself
// (the channel's service config; the same retryPolicy as the Python, Go and C++
// clients), RESOURCE_EXHAUSTED with RetryInfo retried after the server's delay,
// TLS / mutual TLS and a bearer token from options, and MasqueradeError for
// every failure.
import { readFileSync } from "node:fs";
import {
  type ClientDuplexStream,
  credentials as grpcCredentials,
  type ChannelCredentials,
  type ClientOptions,
  Metadata,
  status,
} from "@grpc/grpc-js";
import {
  type AnonymizeBatchResponse,
  type AnonymizeEvent,
  type AnonymizeRequest,
  type AnonymizeResponse,
  AnonymizerClient,
  type ServerInfo,
} from "./gen/masquerade/v1/anonymizer";
import { MasqueradeError } from "./errors";

export * from "./gen/masquerade/v1/anonymizer";
export { MasqueradeError, statusName, status } from "./errors";

const SERVICE = "masquerade.v1.Anonymizer";

/**
 * gRPC's retryPolicy for UNAVAILABLE, the project's one policy in all four clients:
 * 4 attempts in all, backoff 0.2 s doubling to at most 5 s (gRPC waits a random time
 * up to that), only before any response arrived and never past the call's deadline.
 * AnonymizeBatch is not retried: the server may already be running what was sent.
 */
export const SERVICE_CONFIG = {
  methodConfig: [
    {
      name: [{ service: SERVICE }],
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: "0.2s",
        maxBackoff: "5s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
    { name: [{ service: SERVICE, method: "AnonymizeBatch" }] },
  ],
};

/**
 * RESOURCE_EXHAUSTED with a google.rpc.RetryInfo detail (a per-client quota, the queue) is
 * retried by the client itself, the same in all four clients: it waits the server's delay and
 * sends again, up to 4 attempts in all, never past the call's deadline and never for a delay
 * over 30 s (then the MasqueradeError, whose `retryDelayMs` holds the advice, is thrown).
 * Only before the first event: a call that produced events is never sent again.
 */
export const RETRY_INFO_ATTEMPTS = 4;
export const MAX_RETRY_DELAY_MS = 30_000;

export interface MasqueradeClientOptions {
  /** PEM file of the CA that signed the server's certificate; implies TLS. */
  caFile?: string;
  /** PEM files of this client's certificate and key, for servers that require mutual TLS. */
  certFile?: string;
  keyFile?: string;
  /** TLS with Node's default CA roots when no caFile is given. */
  tls?: boolean;
  /** Sent as `authorization: Bearer <token>` metadata on every call. */
  token?: string;
  /** Overrides caFile/certFile/keyFile/tls. Default: plaintext (a server on loopback). */
  credentials?: ChannelCredentials;
  /** Deadline of each call, retries included, unless the call sets its own. Default 300 s. */
  timeoutMs?: number;
  /** Attempts in all for RESOURCE_EXHAUSTED answers carrying RetryInfo (1: never retry). Default 4. */
  retryInfoAttempts?: number;
  channelOptions?: Partial<ClientOptions>;
}

export interface CallOptions {
  timeoutMs?: number;
  metadata?: Metadata;
}

/** Channel credentials from the TLS options: plaintext when none is set. */
export function channelCredentials(options: MasqueradeClientOptions): ChannelCredentials {
  if (options.credentials) return options.credentials;
  if ((options.certFile === undefined) !== (options.keyFile === undefined)) {
    throw new Error("certFile and keyFile: give both (mutual TLS) or neither");
  }
  if (options.caFile === undefined && options.certFile === undefined && !options.tls) {
    return grpcCredentials.createInsecure();
  }
  const read = (path?: string) => (path === undefined ? null : readFileSync(path));
  return grpcCredentials.createSsl(read(options.caFile), read(options.keyFile), read(options.certFile));
}

export class MasqueradeClient {
  /** The generated stub, for calls this wrapper does not cover. */
  readonly raw: AnonymizerClient;
  private readonly timeoutMs: number;
  private readonly token?: string;
  private readonly retryInfoAttempts: number;

  constructor(address: string, options: MasqueradeClientOptions = {}) {
    const channelOptions = {
      // Results are whole encoded images, larger than grpc-js's 4 MiB default; 64 MiB matches the server.
      "grpc.max_receive_message_length": 64 << 20,
      "grpc.enable_retries": 1,
      "grpc.service_config": JSON.stringify(SERVICE_CONFIG),
      ...options.channelOptions,
    };
    if (options.token !== undefined && (options.token.trim() === "" || /\s/.test(options.token.trim()))) {
      throw new Error("token: empty or holds whitespace");
    }
    this.token = options.token?.trim();
    this.raw = new AnonymizerClient(address, channelCredentials(options), channelOptions);
    this.timeoutMs = options.timeoutMs ?? 300_000;
    this.retryInfoAttempts = options.retryInfoAttempts ?? RETRY_INFO_ATTEMPTS;
  }

  /** The call's metadata plus the bearer token. */
  private metadata(options: CallOptions): Metadata {
    const metadata = options.metadata?.clone() ?? new Metadata();
    if (this.token !== undefined) metadata.set("authorization", `Bearer ${this.token}`);
    return metadata;
  }

  close(): void {
    this.raw.close();
  }

  /**
   * Sends one image through AnonymizeStream and yields its events as they arrive:
   * queued, facesFound, progress..., then exactly one result. Throws MasqueradeError.
   */
  async *anonymizeStream(request: AnonymizeRequest, options: CallOptions = {}): AsyncGenerator<AnonymizeEvent> {
    const deadline = new Date(Date.now() + (options.timeoutMs ?? this.timeoutMs));
    for (let attempt = 1; ; attempt++) {
      const call = this.raw.anonymizeStream(request, this.metadata(options), { deadline });
      let started = false;
      let waitMs: number | undefined;
      try {
        for await (const event of call as AsyncIterable<AnonymizeEvent>) {
          started = true;
          yield event;
        }
        return;
      } catch (err) {
        const error = MasqueradeError.from(err);
        waitMs = started ? undefined : this.waitBeforeRetry(error, attempt, deadline);
        if (waitMs === undefined) throw error;
      } finally {
        call.cancel(); // no-op when finished; frees the server's slot when the caller stops early
      }
      await new Promise((resolve) => setTimeout(resolve, waitMs)); // the server's RetryInfo delay
    }
  }

  /** The ms to wait before sending again after `attempt` failed with `error`; undefined: do not retry. */
  private waitBeforeRetry(error: MasqueradeError, attempt: number, deadline: Date): number | undefined {
    const delay = error.retryDelayMs;
    if (error.code !== status.RESOURCE_EXHAUSTED || delay === undefined || attempt >= this.retryInfoAttempts) {
      return undefined;
    }
    if (delay > MAX_RETRY_DELAY_MS || delay >= deadline.getTime() - Date.now()) return undefined;
    return delay;
  }

  /** Runs AnonymizeStream to its end and returns the result, passing each event to `onEvent`. */
  async anonymize(
    request: AnonymizeRequest,
    onEvent?: (event: AnonymizeEvent) => void,
    options: CallOptions = {},
  ): Promise<AnonymizeResponse> {
    for await (const event of this.anonymizeStream(request, options)) {
      onEvent?.(event);
      if (event.event?.$case === "result") return event.event.value;
    }
    throw new MasqueradeError(status.INTERNAL, "the stream ended without a result event");
  }

  /**
   * Sends many images over one AnonymizeBatch stream and yields the responses in
   * completion order, each with the `requestId` of its request (required, unique
   * among the requests in flight). Requests are written as `requests` produces
   * them, respecting flow control, and the write side is closed when it ends.
   * A request the server rejects is yielded as a response whose `outcome` is an
   * `error` (`code` is a gRPC status number); the stream goes on. A failure of the
   * call itself throws MasqueradeError; an error thrown by `requests` cancels the
   * call and is rethrown as is. One deadline covers the whole stream; never
   * retried, as the server may already be running what was sent. Stopping the
   * iteration early cancels the call and every request still running on it.
   */
  async *anonymizeBatch(
    requests: Iterable<AnonymizeRequest> | AsyncIterable<AnonymizeRequest>,
    options: CallOptions = {},
  ): AsyncGenerator<AnonymizeBatchResponse> {
    const deadline = new Date(Date.now() + (options.timeoutMs ?? this.timeoutMs));
    const call = this.raw.anonymizeBatch(this.metadata(options), { deadline });
    // The iteration below reports errors; this listener keeps the one a cancel emits after it stopped from being uncaught.
    call.on("error", () => {});
    const state: { finished: boolean; inputFailed: boolean; inputError?: unknown } = { finished: false, inputFailed: false };
    // Writes on its own, so a slow reader never blocks writing and the reverse; never rejects.
    void writeAll(call, requests, state);
    try {
      for await (const response of call as AsyncIterable<AnonymizeBatchResponse>) yield response;
    } catch (err) {
      if (state.inputFailed) throw state.inputError;
      throw MasqueradeError.from(err);
    } finally {
      state.finished = true;
      call.cancel(); // no-op when finished; frees the server's slots when the caller stops early
    }
    if (state.inputFailed) throw state.inputError;
  }

  /** Version, methods available, models loaded, limits and defaults. */
  async getServerInfo(options: CallOptions = {}): Promise<ServerInfo> {
    const deadline = new Date(Date.now() + (options.timeoutMs ?? this.timeoutMs));
    try {
      return await new Promise<ServerInfo>((resolve, reject) =>
        this.raw.getServerInfo({}, this.metadata(options), { deadline }, (err, info) => (err ? reject(err) : resolve(info))),
      );
    } catch (err) {
      throw MasqueradeError.from(err);
    }
  }
}

/**
 * Writes every request of `requests` to `call`, waiting for 'drain' when grpc-js
 * buffers too much, then half-closes the call. Stops when `state.finished` (the
 * reader is gone or the call ended); an error from `requests` cancels the call.
 */
async function writeAll(
  call: ClientDuplexStream<AnonymizeRequest, AnonymizeBatchResponse>,
  requests: Iterable<AnonymizeRequest> | AsyncIterable<AnonymizeRequest>,
  state: { finished: boolean; inputFailed: boolean; inputError?: unknown },
): Promise<void> {
  let ended = false; // the call got its status: nothing more can be written
  const onEnd = () => (ended = true);
  call.once("status", onEnd);
  call.once("close", onEnd);
  try {
    for await (const request of requests) {
      if (state.finished || ended) return; // leaving the loop calls the input's return()
      if (!call.write(request) && !ended) await drainedOrEnded(call);
    }
    if (!state.finished && !ended) call.end();
  } catch (err) {
    state.inputError = err;
    state.inputFailed = true;
    call.cancel();
  } finally {
    call.off("status", onEnd);
    call.off("close", onEnd);
  }
}

/** Resolves on 'drain', or when the call ends and no 'drain' will come. */
function drainedOrEnded(call: ClientDuplexStream<AnonymizeRequest, AnonymizeBatchResponse>): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      call.off("drain", done);
      call.off("status", done);
      call.off("close", done);
      resolve();
    };
    call.once("drain", done);
    call.once("status", done);
    call.once("close", done);
  });
}
