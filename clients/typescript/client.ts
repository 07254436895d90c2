// A thin client over the generated grpc-js stub (gen/, built from proto/ by
// `npm run build`): one deadline per call, retries of UNAVAILABLE by gRPC itself
// (the channel's service config; the same retryPolicy as the Python, Go and C++
// clients), RESOURCE_EXHAUSTED with RetryInfo retried after the server's delay,
// TLS / mutual TLS and a bearer token from options, and MasqueradeError for
// every failure.
import { readFileSync } from "node:fs";
import { open, rename, rm, stat } from "node:fs/promises";
import { basename } from "node:path";
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
  type AnonymizeVideoRequest,
  type AnonymizeVideoResponse,
  AnonymizerClient,
  type FrameRequest,
  type FrameResult,
  FrameStreamOptions,
  type ServerInfo,
  type TrackRecord,
  type VideoProgress,
  type VideoReport,
  VideoStart,
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

/** Upload chunk size of anonymizeVideo: well under the 64 MiB message limit. */
export const VIDEO_CHUNK_BYTES = 1 << 20;
/** Frames in flight of anonymizeFrames when the options set no window (the server's default too). */
export const DEFAULT_FRAME_WINDOW = 4;

export interface VideoCallOptions extends CallOptions {
  /** Called with each progress event (frames done of total, fps, tracks) as it arrives. */
  onProgress?: (progress: VideoProgress) => void;
  /** Write the anonymized file here (through `<path>.partial`, renamed at the end) instead of returning it. */
  outputPath?: string;
  chunkBytes?: number;
}

export interface VideoResult {
  /** The anonymized file; empty when `outputPath` was given (the file is there). */
  video: Buffer;
  tracks: TrackRecord[];
  /** The final report: frames, tracks, self-check, `complete`, `reportJson` (the CLI's JSON document). */
  report: VideoReport;
}

/**
 * One live frame: encoded JPEG/PNG/WebP bytes, or raw RGB (height * width * 3 bytes, row by row), and its
 * capture time in seconds when known (the tracker moves held boxes by it; any clock, one per stream).
 */
export type LiveFrame =
  | { encoded: Uint8Array; timestamp?: number }
  | { rgb: Uint8Array; width: number; height: number; timestamp?: number };

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
    const state: WriteState = { finished: false, inputFailed: false };
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

  /**
   * Anonymizes a whole video file over AnonymizeVideo: `start` (the options; `filename` and
   * `sizeBytes` are filled in from `source` when unset) goes first, then the file in chunks, read
   * from disk only as flow control lets them go, so a large clip is never held in memory. Progress
   * events go to `options.onProgress`; the anonymized file arrives in order (each chunk's offset is
   * checked) and the report last. One deadline (`timeoutMs`, else the client's) covers upload,
   * processing and download. RESOURCE_EXHAUSTED with RetryInfo before any response is retried after
   * the server's delay, as for images (the upload starts again). Throws MasqueradeError; an error
   * reading `source` or writing the output cancels the call (the server deletes its copy) and is
   * rethrown as is. With `outputPath`, a failed call leaves no file there.
   */
  async anonymizeVideo(
    source: string | Uint8Array,
    start: Partial<VideoStart> = {},
    options: VideoCallOptions = {},
  ): Promise<VideoResult> {
    const chunkBytes = options.chunkBytes ?? VIDEO_CHUNK_BYTES;
    const first = VideoStart.fromPartial({
      filename: typeof source === "string" ? basename(source) : "video.mp4",
      sizeBytes: typeof source === "string" ? (await stat(source)).size : source.length,
      ...start,
    });
    const deadline = new Date(Date.now() + (options.timeoutMs ?? this.timeoutMs));
    const partial = options.outputPath === undefined ? undefined : `${options.outputPath}.partial`;
    for (let attempt = 1; ; attempt++) {
      const sink = partial === undefined ? undefined : await open(partial, "w");
      let started = false;
      let waitMs: number | undefined;
      try {
        const result = await this.videoOnce(first, videoRequests(first, source, chunkBytes), deadline, options, sink, () => {
          started = true;
        });
        if (sink !== undefined) await sink.close();
        if (partial !== undefined && options.outputPath !== undefined) await rename(partial, options.outputPath);
        return result;
      } catch (err) {
        await sink?.close().catch(() => {});
        if (partial !== undefined) await rm(partial, { force: true });
        if (!(err instanceof MasqueradeError) || started) throw err;
        waitMs = this.waitBeforeRetry(err, attempt, deadline);
        if (waitMs === undefined) throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, waitMs)); // the server's RetryInfo delay
    }
  }

  /** One AnonymizeVideo call; `onStarted` runs when the first response arrives. */
  private async videoOnce(
    start: VideoStart,
    requests: AsyncIterable<AnonymizeVideoRequest>,
    deadline: Date,
    options: VideoCallOptions,
    sink: Awaited<ReturnType<typeof open>> | undefined,
    onStarted: () => void,
  ): Promise<VideoResult> {
    const call = this.raw.anonymizeVideo(this.metadata(options), { deadline });
    call.on("error", () => {}); // the iteration below reports it
    const state: WriteState = { finished: false, inputFailed: false };
    void writeAll(call, requests, state);
    const chunks: Buffer[] = [];
    let received = 0;
    let report: VideoReport | undefined;
    try {
      for await (const response of call as AsyncIterable<AnonymizeVideoResponse>) {
        onStarted();
        const event = response.event;
        if (event?.$case === "progress") {
          options.onProgress?.(event.value);
        } else if (event?.$case === "output") {
          if (event.value.offset !== received) {
            throw new MasqueradeError(status.INTERNAL, `output chunk at ${event.value.offset}, expected ${received}`);
          }
          if (sink !== undefined) await sink.write(event.value.data);
          else chunks.push(event.value.data);
          received += event.value.data.length;
        } else if (event?.$case === "report") {
          if (event.value.outputBytes !== received) {
            throw new MasqueradeError(status.INTERNAL, `received ${received} bytes, the report says ${event.value.outputBytes}`);
          }
          report = event.value; // the last message; the call's OK status follows
        }
      }
    } catch (err) {
      if (state.inputFailed) throw state.inputError;
      if (err instanceof MasqueradeError) throw err;
      if (isCallError(err)) throw MasqueradeError.from(err);
      throw err; // writing the output failed: the call is cancelled below
    } finally {
      state.finished = true;
      call.cancel(); // no-op when finished; frees the server's spool at once otherwise
    }
    if (state.inputFailed) throw state.inputError;
    if (report === undefined) throw new MasqueradeError(status.INTERNAL, "the stream ended without a report");
    return { video: Buffer.concat(chunks), tracks: report.tracks, report };
  }

  /**
   * Streams live frames over AnonymizeFrames and yields each one covered, in the order sent, with its
   * faces (track ids, boxes, detected or held) and server-side latency. `streamOptions` goes in the
   * first message (`window`, `tracking.detectEvery`, `format`...). At most `window` frames (default 4)
   * are sent and not yet answered: `frames` is read only as results come back, so a slow consumer of
   * this generator slows the reading of frames and nothing queues without bound. Sequence numbers are
   * 0, 1, 2...; give a frame's `timestamp` as its capture time (seconds, one clock per stream) when known,
   * else the server places it 1/30 s after the frame before. No deadline unless `timeoutMs` is given: a live
   * stream runs as long as its frames do. A stream refused RESOURCE_EXHAUSTED with RetryInfo before
   * any result (the per-client quota) is reopened after the server's delay, resending the frames it
   * held; a stream ended later (a frame over the quota, a drain's UNAVAILABLE) throws MasqueradeError
   * and the caller reconnects. Stopping the iteration early cancels the stream.
   */
  async *anonymizeFrames(
    frames: Iterable<LiveFrame> | AsyncIterable<LiveFrame>,
    streamOptions: Partial<FrameStreamOptions> = {},
    options: CallOptions = {},
  ): AsyncGenerator<FrameResult> {
    const optionsMessage = FrameStreamOptions.fromPartial(streamOptions);
    const window = optionsMessage.window ?? DEFAULT_FRAME_WINDOW;
    const source = asyncIterator(frames);
    const unanswered: FrameRequest[] = []; // sent, no result yet: at most `window`
    let sequence = 0;
    let sourceDone = false;
    const deadline = options.timeoutMs === undefined ? undefined : new Date(Date.now() + options.timeoutMs);
    for (let attempt = 1; ; attempt++) {
      const call = this.raw.anonymizeFrames(this.metadata(options), deadline === undefined ? {} : { deadline });
      call.on("error", () => {});
      const slots = new Window(window);
      const replay = unanswered.splice(0); // a refused attempt's frames go again, first
      const state: WriteState = { finished: false, inputFailed: false };
      async function* requests(): AsyncGenerator<FrameRequest> {
        let first = true;
        while (true) {
          await slots.acquire();
          let message = replay.shift();
          if (message === undefined) {
            if (sourceDone) return;
            const next = await source.next();
            if (next.done) {
              sourceDone = true;
              return;
            }
            message = frameRequest(next.value, sequence++);
          }
          unanswered.push(message);
          yield first ? { ...message, options: optionsMessage } : message;
          first = false;
        }
      }
      void writeAll(call, requests(), state);
      let started = false;
      let waitMs: number | undefined;
      try {
        for await (const result of call as AsyncIterable<FrameResult>) {
          started = true;
          const expected = unanswered.shift();
          if (expected === undefined || result.sequence !== expected.sequence) {
            throw new MasqueradeError(
              status.INTERNAL,
              `frame ${result.sequence} came back, expected ${expected === undefined ? "none" : expected.sequence}`,
            );
          }
          slots.release();
          yield result;
        }
        if (state.inputFailed) throw state.inputError;
        return;
      } catch (err) {
        if (state.inputFailed) throw state.inputError;
        const error = MasqueradeError.from(err);
        waitMs = started ? undefined : this.waitBeforeRetry(error, attempt, deadline ?? new Date(Date.now() + MAX_RETRY_DELAY_MS + 1));
        if (waitMs === undefined) throw error;
      } finally {
        state.finished = true;
        slots.close();
        call.cancel();
        unanswered.push(...replay.splice(0)); // refused before they were resent: they go next time
      }
      await new Promise((resolve) => setTimeout(resolve, waitMs)); // the server's RetryInfo delay
    }
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
async function writeAll<Request, Response>(
  call: ClientDuplexStream<Request, Response>,
  requests: Iterable<Request> | AsyncIterable<Request>,
  state: WriteState,
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
function drainedOrEnded<Request, Response>(call: ClientDuplexStream<Request, Response>): Promise<void> {
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

interface WriteState {
  finished: boolean;
  inputFailed: boolean;
  inputError?: unknown;
}

function isCallError(err: unknown): boolean {
  return err instanceof Error && typeof (err as { code?: unknown }).code === "number" && "details" in err;
}

/** AnonymizeVideo's requests: `start`, then the file in chunks with their offsets, read as they are sent. */
async function* videoRequests(
  start: VideoStart,
  source: string | Uint8Array,
  chunkBytes: number,
): AsyncGenerator<AnonymizeVideoRequest> {
  yield { part: { $case: "start", value: start } };
  let offset = 0;
  if (typeof source !== "string") {
    for (; offset < source.length; offset += chunkBytes) {
      const data = Buffer.from(source.subarray(offset, offset + chunkBytes));
      yield { part: { $case: "chunk", value: { offset, data } } };
    }
    return;
  }
  const file = await open(source, "r");
  try {
    while (true) {
      const buffer = Buffer.alloc(chunkBytes);
      const { bytesRead } = await file.read(buffer, 0, chunkBytes, offset);
      if (bytesRead === 0) return;
      yield { part: { $case: "chunk", value: { offset, data: buffer.subarray(0, bytesRead) } } };
      offset += bytesRead;
    }
  } finally {
    await file.close();
  }
}

function frameRequest(frame: LiveFrame, sequence: number): FrameRequest {
  const timestamp = frame.timestamp ?? 0; // 0: the server places it 1/30 s after the frame before
  if ("encoded" in frame) return { sequence, timestamp, pixels: { $case: "encoded", value: Buffer.from(frame.encoded) } };
  const { rgb, width, height } = frame;
  if (rgb.length !== width * height * 3) {
    throw new RangeError(`raw frame ${sequence}: ${rgb.length} bytes; ${width}x${height} RGB needs ${width * height * 3}`);
  }
  return { sequence, timestamp, pixels: { $case: "raw", value: { rgb: Buffer.from(rgb), width, height } } };
}

function asyncIterator<T>(items: Iterable<T> | AsyncIterable<T>): AsyncIterator<T> {
  if (Symbol.asyncIterator in items) return (items as AsyncIterable<T>)[Symbol.asyncIterator]();
  const iterator = (items as Iterable<T>)[Symbol.iterator]();
  return { next: async () => iterator.next() };
}

/** A counting semaphore of frames in flight; `close` wakes every waiter (the stream ended). */
class Window {
  private free: number;
  private waiters: (() => void)[] = [];
  private closed = false;

  constructor(size: number) {
    this.free = size;
  }

  async acquire(): Promise<void> {
    while (this.free === 0 && !this.closed) await new Promise<void>((resolve) => this.waiters.push(resolve));
    if (this.closed) throw new Error("the stream ended");
    this.free--;
  }

  release(): void {
    this.free++;
    this.waiters.shift()?.();
  }

  close(): void {
    this.closed = true;
    for (const wake of this.waiters.splice(0)) wake();
  }
}
