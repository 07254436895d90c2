// A thin client over the generated grpc-js stub (gen/, built from proto/ by
// `npm run build`): one deadline per call across all its attempts, retries of
// UNAVAILABLE with exponential backoff before any response arrived, and
// MasqueradeError for every failure.
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

/** When and how often a call that found the server UNAVAILABLE is tried again. */
export interface RetryPolicy {
  /** Attempts in all, the first included. */
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  multiplier: number;
}

export const DEFAULT_RETRY: RetryPolicy = { maxAttempts: 4, initialBackoffMs: 200, maxBackoffMs: 5_000, multiplier: 2 };

export interface MasqueradeClientOptions {
  /** Default: insecure (plaintext), as the server listens on loopback or behind a proxy. */
  credentials?: ChannelCredentials;
  /** Deadline of each call, all attempts together, unless the call sets its own. Default 300 s. */
  timeoutMs?: number;
  retry?: Partial<RetryPolicy>;
  channelOptions?: Partial<ClientOptions>;
}

export interface CallOptions {
  timeoutMs?: number;
  metadata?: Metadata;
}

export class MasqueradeClient {
  /** The generated stub, for calls this wrapper does not cover. */
  readonly raw: AnonymizerClient;
  private readonly timeoutMs: number;
  private readonly retry: RetryPolicy;

  constructor(address: string, options: MasqueradeClientOptions = {}) {
    // Results are whole encoded images, larger than grpc-js's 4 MiB default; 64 MiB matches the server.
    const channelOptions = { "grpc.max_receive_message_length": 64 << 20, ...options.channelOptions };
    this.raw = new AnonymizerClient(address, options.credentials ?? grpcCredentials.createInsecure(), channelOptions);
    this.timeoutMs = options.timeoutMs ?? 300_000;
    this.retry = { ...DEFAULT_RETRY, ...options.retry };
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
      const call = this.raw.anonymizeStream(request, options.metadata ?? new Metadata(), { deadline });
      let received = false;
      try {
        for await (const event of call as AsyncIterable<AnonymizeEvent>) {
          received = true;
          yield event;
        }
        return;
      } catch (err) {
        const error = MasqueradeError.from(err);
        // Once an event arrived the server has the job; a retry would run it twice.
        if (received || !(await this.backoffBeforeRetry(error, attempt, deadline))) throw error;
      } finally {
        call.cancel(); // no-op when finished; frees the server's slot when the caller stops early
      }
    }
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
    const call = this.raw.anonymizeBatch(options.metadata ?? new Metadata(), { deadline });
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
    for (let attempt = 1; ; attempt++) {
      try {
        return await new Promise<ServerInfo>((resolve, reject) =>
          this.raw.getServerInfo({}, options.metadata ?? new Metadata(), { deadline }, (err, info) =>
            err ? reject(err) : resolve(info),
          ),
        );
      } catch (err) {
        const error = MasqueradeError.from(err);
        if (!(await this.backoffBeforeRetry(error, attempt, deadline))) throw error;
      }
    }
  }

  /** Sleeps before the next attempt and returns true, or returns false when `error` is final. */
  private async backoffBeforeRetry(error: MasqueradeError, attempt: number, deadline: Date): Promise<boolean> {
    if (error.code !== status.UNAVAILABLE || attempt >= this.retry.maxAttempts) return false;
    const ceiling = Math.min(this.retry.maxBackoffMs, this.retry.initialBackoffMs * this.retry.multiplier ** (attempt - 1));
    const delayMs = ceiling * (0.5 + Math.random() / 2); // jitter, so clients that failed together do not retry together
    if (Date.now() + delayMs >= deadline.getTime()) return false;
    await new Promise((resolve) => setTimeout(resolve, delayMs));
    return true;
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
