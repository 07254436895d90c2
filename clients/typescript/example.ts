// masquerade-anonymize: sends one image through AnonymizeStream, prints each event
// as it arrives and writes the anonymized image. With --batch, sends every input
// over one AnonymizeBatch stream (request_id = the input's file name), prints one
// line per response as it arrives and writes each result to OUTDIR/<file name>.
// Exit codes: 0 done (with --batch: every image); 3 INVALID_ARGUMENT (the gRPC code
// number; with --batch: some image was, and nothing failed otherwise); 2 bad command
// line; 1 any other failure.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { parseArgs } from "node:util";
import {
  type AnonymizeBatchResponse,
  type AnonymizeEvent,
  AnonymizeRequest,
  DetectionOptions,
  MasqueradeClient,
  type MasqueradeClientOptions,
  MasqueradeError,
  Method,
  phaseToJSON,
  ReversePersonalizationParams,
  status,
  statusName,
} from "./client";

const USAGE =
  "usage: node dist/example.js --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]\n" +
  "       [--aligned] [--steps N] [--timeout SECONDS]\n" +
  "       [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--token-file FILE] INPUT_IMAGE OUTPUT_IMAGE\n" +
  "       node dist/example.js --batch --server HOST:PORT [options as above] INPUT_IMAGE... OUTPUT_DIR";

const METHODS: Record<string, Method> = {
  reverse_personalization: Method.REVERSE_PERSONALIZATION,
  blur: Method.BLUR,
  pixelate: Method.PIXELATE,
  solid: Method.SOLID,
};

class UsageError extends Error {}

interface Args {
  server: string;
  /** Every field but requestId and image. */
  template: Omit<AnonymizeRequest, "requestId" | "image">;
  timeoutMs: number;
  /** TLS and token options of the client. */
  connection: MasqueradeClientOptions;
  batch: boolean;
  inputs: string[];
  /** The output image, or with --batch the output directory. */
  output: string;
}

function parseCommandLine(argv: string[]): Args {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        server: { type: "string" },
        method: { type: "string" },
        aligned: { type: "boolean", default: false },
        steps: { type: "string" },
        timeout: { type: "string", default: "300" },
        batch: { type: "boolean", default: false },
        tls: { type: "boolean", default: false },
        "tls-ca": { type: "string" },
        "tls-cert": { type: "string" },
        "tls-key": { type: "string" },
        "token-file": { type: "string" },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (!values.server) throw new UsageError("--server HOST:PORT is required");
  if (values.batch) {
    if (positionals.length < 2) throw new UsageError("--batch: expected INPUT_IMAGE... OUTPUT_DIR");
    const seen = new Set<string>();
    for (const input of positionals.slice(0, -1)) {
      const name = basename(input);
      if (seen.has(name)) throw new UsageError(`--batch: two inputs are named ${name}; file names are the request ids and output names`);
      seen.add(name);
    }
  } else if (positionals.length !== 2) {
    throw new UsageError("expected INPUT_IMAGE and OUTPUT_IMAGE");
  }
  const method = values.method === undefined ? Method.METHOD_UNSPECIFIED : METHODS[values.method];
  if (method === undefined) throw new UsageError(`--method ${values.method}: use one of ${Object.keys(METHODS).join(", ")}`);
  const steps = values.steps === undefined ? undefined : Number(values.steps);
  if (steps !== undefined && !(Number.isInteger(steps) && steps > 0)) throw new UsageError(`--steps ${values.steps}: use a positive integer`);
  const timeoutSeconds = Number(values.timeout);
  if (!(timeoutSeconds > 0)) throw new UsageError(`--timeout ${values.timeout}: use a positive number of seconds`);

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
  const connection: MasqueradeClientOptions = {
    tls: values.tls,
    caFile: values["tls-ca"],
    certFile: values["tls-cert"],
    keyFile: values["tls-key"],
    token,
  };

  // fromPartial: fields the proto gains later (priority, ...) take their defaults.
  const { requestId: _id, image: _image, ...template } = AnonymizeRequest.fromPartial({
    method,
    params: steps === undefined ? undefined : ReversePersonalizationParams.fromPartial({ steps }),
    detection: values.aligned ? DetectionOptions.fromPartial({ aligned: true }) : undefined,
  });
  return {
    server: values.server,
    template,
    timeoutMs: timeoutSeconds * 1000,
    connection,
    batch: values.batch,
    inputs: positionals.slice(0, -1),
    output: positionals[positionals.length - 1],
  };
}

function describe(event: AnonymizeEvent): string {
  const e = event.event;
  switch (e?.$case) {
    case "queued":
      return `queued position=${e.value.position}`;
    case "facesFound":
      return `faces_found n=${e.value.boxes.length}`;
    case "progress":
      return `progress phase=${phaseToJSON(e.value.phase)} step=${e.value.step}/${e.value.total}`;
    case "result":
      return `result faces=${e.value.faces.length} complete=${e.value.complete} bytes=${e.value.image.length}`;
    default:
      return "unknown_event";
  }
}

function describeBatch(response: AnonymizeBatchResponse): string {
  const outcome = response.outcome;
  switch (outcome?.$case) {
    case "result":
      return `batch id=${response.requestId} faces=${outcome.value.faces.length} complete=${outcome.value.complete} bytes=${outcome.value.image.length}`;
    case "error":
      return `batch id=${response.requestId} error=${statusName(outcome.value.code)}: ${outcome.value.message}`;
    default:
      return `batch id=${response.requestId} error=INTERNAL: the response has neither result nor error`;
  }
}

/** One request per input, each file read only when the stream is ready for it. */
function* batchRequests(args: Args): Generator<AnonymizeRequest> {
  for (const input of args.inputs) yield { ...args.template, requestId: basename(input), image: readFileSync(input) };
}

/** --batch: returns the exit code; throws MasqueradeError when the call itself fails. */
async function runBatch(client: MasqueradeClient, args: Args): Promise<number> {
  mkdirSync(args.output, { recursive: true });
  const pending = new Set(args.inputs.map((input) => basename(input)));
  let invalid = false;
  let failed = false;
  for await (const response of client.anonymizeBatch(batchRequests(args))) {
    console.log(describeBatch(response));
    if (!pending.delete(response.requestId)) {
      console.error(`error: a response for an unknown or already answered request id ${JSON.stringify(response.requestId)}`);
      failed = true;
    } else if (response.outcome?.$case === "result") {
      try {
        writeFileSync(join(args.output, response.requestId), response.outcome.value.image);
      } catch (err) {
        console.error(`error: ${(err as Error).message}`);
        failed = true;
      }
    } else if (response.outcome?.$case === "error" && response.outcome.value.code === status.INVALID_ARGUMENT) {
      invalid = true;
    } else {
      failed = true;
    }
  }
  for (const id of pending) {
    console.error(`error: no response for request id ${id}`);
    failed = true;
  }
  return failed ? 1 : invalid ? 3 : 0;
}

async function main(): Promise<number> {
  let args: Args;
  try {
    args = parseCommandLine(process.argv.slice(2));
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`error: ${err.message}\n${USAGE}`);
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
    if (args.batch) return await runBatch(client, args);
    const request: AnonymizeRequest = { ...args.template, requestId: "", image: readFileSync(args.inputs[0]) };
    const result = await client.anonymize(request, (event) => console.log(describe(event)));
    writeFileSync(args.output, result.image);
    return 0;
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
