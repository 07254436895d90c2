// gRPC failures as one typed error: callers branch on `err.code` (a grpc `status`
// number) or `err.codeName` instead of parsing messages.
import { status, type ServiceError } from "@grpc/grpc-js";

export { status };

/** A failed Masquerade call. `code` is the gRPC status code (3 = INVALID_ARGUMENT, ...). */
export class MasqueradeError extends Error {
  override readonly name = "MasqueradeError";

  constructor(
    readonly code: status,
    /** The server's message, e.g. "image: not a decodable JPEG, PNG or WebP". */
    readonly details: string,
    options?: { cause?: unknown },
  ) {
    super(`${statusName(code)}: ${details}`, options);
  }

  /** The code's canonical name, e.g. "INVALID_ARGUMENT". */
  get codeName(): string {
    return statusName(this.code);
  }

  /** Wraps a grpc-js ServiceError (or anything thrown by a call) as a MasqueradeError. */
  static from(err: unknown): MasqueradeError {
    if (err instanceof MasqueradeError) return err;
    if (isServiceError(err)) return new MasqueradeError(err.code, err.details, { cause: err });
    const message = err instanceof Error ? err.message : String(err);
    return new MasqueradeError(status.UNKNOWN, message, { cause: err });
  }
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
