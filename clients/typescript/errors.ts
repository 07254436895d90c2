// gRPC failures as one typed error: callers branch on `err.code` (a grpc `status`
// number) or `err.codeName` instead of parsing messages.
import { status, type Metadata, type ServiceError } from "@grpc/grpc-js";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";

export { status };

/** A failed Masquerade call. `code` is the gRPC status code (3 = INVALID_ARGUMENT, ...). */
export class MasqueradeError extends Error {
  override readonly name = "MasqueradeError";

  constructor(
    readonly code: status,
    /** The server's message, e.g. "image: not a decodable JPEG, PNG or WebP". */
    readonly details: string,
    options?: { cause?: unknown; retryDelayMs?: number },
  ) {
    super(`${statusName(code)}: ${details}`, options);
    this.retryDelayMs = options?.retryDelayMs;
  }

  /**
   * How long the server asked the caller to wait before retrying (google.rpc.RetryInfo
   * on RESOURCE_EXHAUSTED: a per-client quota, the queue), in ms; undefined when it gave none.
   */
  readonly retryDelayMs?: number;

  /** The code's canonical name, e.g. "INVALID_ARGUMENT". */
  get codeName(): string {
    return statusName(this.code);
  }

  /** Wraps a grpc-js ServiceError (or anything thrown by a call) as a MasqueradeError. */
  static from(err: unknown): MasqueradeError {
    if (err instanceof MasqueradeError) return err;
    if (isServiceError(err)) {
      return new MasqueradeError(err.code, err.details, { cause: err, retryDelayMs: retryDelayMs(err.metadata) });
    }
    const message = err instanceof Error ? err.message : String(err);
    return new MasqueradeError(status.UNKNOWN, message, { cause: err });
  }
}

const STATUS_DETAILS = "grpc-status-details-bin";
const RETRY_INFO_URL = "type.googleapis.com/google.rpc.RetryInfo";

/**
 * The delay of the google.rpc.RetryInfo detail in a failed call's trailers, in ms, or undefined.
 * google.rpc.Status is {1: code, 2: message, 3: repeated Any details}; Any is {1: type_url, 2: value};
 * RetryInfo is {1: Duration retry_delay}; Duration is {1: int64 seconds, 2: int32 nanos}.
 */
export function retryDelayMs(metadata: Metadata | undefined): number | undefined {
  const raw = metadata?.get(STATUS_DETAILS)[0];
  if (raw === undefined || typeof raw === "string") return undefined;
  try {
    for (const detail of fields(raw, 3)) {
      const [typeUrl] = fields(detail, 1);
      const [value] = fields(detail, 2);
      if (typeUrl === undefined || new TextDecoder().decode(typeUrl) !== RETRY_INFO_URL) continue;
      const [duration] = fields(value ?? new Uint8Array(), 1);
      if (duration === undefined) return 0;
      const reader = new BinaryReader(duration);
      let seconds = 0;
      let nanos = 0;
      while (reader.pos < reader.len) {
        const [number, wireType] = reader.tag();
        if (number === 1 && wireType === WireType.Varint) seconds = Number(reader.int64());
        else if (number === 2 && wireType === WireType.Varint) nanos = reader.int32();
        else reader.skip(wireType);
      }
      return Math.max(0, seconds * 1000 + nanos / 1e6);
    }
  } catch {
    return undefined; // a malformed trailer is no advice, not a crash
  }
  return undefined;
}

/** The length-delimited values of field `wanted` in a serialized message. */
function fields(bytes: Uint8Array, wanted: number): Uint8Array[] {
  const reader = new BinaryReader(bytes);
  const found: Uint8Array[] = [];
  while (reader.pos < reader.len) {
    const [number, wireType] = reader.tag();
    if (number === wanted && wireType === WireType.LengthDelimited) found.push(reader.bytes());
    else reader.skip(wireType);
  }
  return found;
}

export function statusName(code: status): string {
  return status[code] ?? `CODE_${code}`;
}

function isServiceError(err: unknown): err is ServiceError {
  return (
    err instanceof Error &&
    typeof (err as Partial<ServiceError>).code === "number" &&
    typeof (err as Partial<ServiceError>).details === "string"
  );
}
