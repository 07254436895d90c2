// What the example commands (example.ts, video-example.ts) share: the connection
// options (--server, --method, --timeout, TLS, --token-file, --help), the token
// file, and one mapping from an error to a message and an exit code.
// Exit codes: 0 done; 2 bad command line (or a file it names cannot be used);
// 3 INVALID_ARGUMENT (the gRPC code number); 1 any other failure.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { MasqueradeClient, type MasqueradeClientOptions, MasqueradeError, Method, status } from "./client";

/** A bad command line: the example prints it with its usage and exits 2. */
export class UsageError extends Error {}

const METHODS: Record<string, Method> = {
  reverse_personalization: Method.REVERSE_PERSONALIZATION,
  blur: Method.BLUR,
  pixelate: Method.PIXELATE,
  solid: Method.SOLID,
};

/** The options every example takes; --timeout's default (seconds) is the example's. */
function commonOptions(defaultTimeoutSeconds: string) {
  return {
    server: { type: "string" },
    method: { type: "string" },
    timeout: { type: "string", default: defaultTimeoutSeconds },
    tls: { type: "boolean", default: false },
    "tls-ca": { type: "string" },
    "tls-cert": { type: "string" },
    "tls-key": { type: "string" },
    "token-file": { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  } as const;
}

/** An example's own option, as node:util parseArgs takes it. */
export interface OptionSpec {
  type: "string" | "boolean";
  short?: string;
  default?: string | boolean;
}

type CommonOptions = ReturnType<typeof commonOptions>;
type Value<S> = S extends { type: "boolean" } ? boolean : string;
/** What parseArgs gives for each option: options with a default always have a value. */
export type Values<O> = { [K in keyof O]: O[K] extends { default: unknown } ? Value<O[K]> : Value<O[K]> | undefined };

/**
 * Parses argv with the common options and the example's own; prints `usage` and exits 0 on
 * -h/--help; requires --server. Throws UsageError.
 */
export function parseCommandLine<O extends Record<string, OptionSpec>>(
  argv: string[],
  usage: string,
  defaultTimeoutSeconds: string,
  own: O,
): { values: Values<CommonOptions & O> & { server: string }; positionals: string[] } {
  const config = { args: argv, allowPositionals: true, options: { ...commonOptions(defaultTimeoutSeconds), ...own } } as const;
  let parsed;
  try {
    parsed = parseArgs(config);
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const common = parsed.values as { help?: boolean; server?: string };
  if (common.help) {
    console.log(usage);
    process.exit(0);
  }
  if (!common.server) throw new UsageError("--server HOST:PORT is required");
  return { values: parsed.values as unknown as Values<CommonOptions & O> & { server: string }, positionals: parsed.positionals };
}

/** The method a --method name stands for; none is the server's default. */
export function methodFrom(name: string | undefined): Method {
  const method = name === undefined ? Method.METHOD_UNSPECIFIED : METHODS[name];
  if (method === undefined) throw new UsageError(`--method ${name}: use one of ${Object.keys(METHODS).join(", ")}`);
  return method;
}

export function timeoutMsFrom(text: string): number {
  const timeoutSeconds = Number(text);
  if (!(timeoutSeconds > 0)) throw new UsageError(`--timeout ${text}: use a positive number of seconds`);
  return timeoutSeconds * 1000;
}

/** The client's TLS and token options; reads the token file (its first non-empty line) now. */
export function connectionFrom(values: {
  tls: boolean;
  "tls-ca"?: string;
  "tls-cert"?: string;
  "tls-key"?: string;
  "token-file"?: string;
}): MasqueradeClientOptions {
  if ((values["tls-cert"] === undefined) !== (values["tls-key"] === undefined)) {
    throw new UsageError("--tls-cert and --tls-key: give both (mutual TLS) or neither");
  }
  let token: string | undefined;
  if (values["token-file"] !== undefined) {
    let text: string;
    try {
      text = readFileSync(values["token-file"], "utf8");
    } catch (err) {
      throw new UsageError(`--token-file ${values["token-file"]}: ${(err as Error).message}`);
    }
    token = text.split(/\r?\n/).map((line) => line.trim()).find((line) => line !== "");
    if (token === undefined) throw new UsageError(`--token-file ${values["token-file"]}: the file holds no token`);
  }
  return { tls: values.tls, caFile: values["tls-ca"], certFile: values["tls-cert"], keyFile: values["tls-key"], token };
}

/** What main needs of an example's parsed command line. */
export interface CommonArgs {
  server: string;
  timeoutMs: number;
  connection: MasqueradeClientOptions;
}

/**
 * An example's main: parses process.argv with `parse` (a UsageError: message + usage, exit 2),
 * connects (an unreadable PEM file: exit 2), then runs `run` and sets the exit code (an RPC
 * error: 3 for INVALID_ARGUMENT, 1 otherwise; anything else: 1).
 */
export function runExample<A extends CommonArgs>(
  usage: string,
  parse: (argv: string[]) => A,
  run: (client: MasqueradeClient, args: A) => Promise<number>,
): void {
  async function main(): Promise<number> {
    let args: A;
    try {
      args = parse(process.argv.slice(2));
    } catch (err) {
      if (!(err instanceof UsageError)) throw err;
      console.error(`error: ${err.message}\n${usage}`);
      return 2;
    }
    let client: MasqueradeClient;
    try {
      client = new MasqueradeClient(args.server, { ...args.connection, timeoutMs: args.timeoutMs });
    } catch (err) {
      console.error(`error: ${(err as Error).message}`); // an unreadable PEM file, a bad token
      return 2;
    }
    try {
      return await run(client, args);
    } catch (err) {
      if (!(err instanceof MasqueradeError)) throw err;
      console.error(`error: ${err.codeName}: ${err.details}`);
      return err.code === status.INVALID_ARGUMENT ? 3 : 1;
    } finally {
      client.close();
    }
  }
  main().then(
    (code) => (process.exitCode = code),
    (err) => {
      console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
      process.exitCode = 1;
    },
  );
}
