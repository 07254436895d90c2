// masquerade-anonymize: sends one image through AnonymizeStream, prints each event
// as it arrives and writes the anonymized image. With --batch, sends every input
// over one AnonymizeBatch stream (request_id = the input's file name), prints one
// line per response as it arrives and writes each result to OUTDIR/<file name>.
// Exit codes: 0 done (with --batch: every image); 3 INVALID_ARGUMENT (the gRPC code
// number; with --batch: some image was, and nothing failed otherwise); 2 bad command
// line; 1 any other failure.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import {
  type AnonymizeBatchResponse,
  type AnonymizeEvent,
  AnonymizeRequest,
  DetectionOptions,
  type MasqueradeClient,
  phaseToJSON,
  ReversePersonalizationParams,
  status,
  statusName,
} from "./client";
import {
  type CommonArgs,
  connectionFrom,
  methodFrom,
  parseCommandLine,
  runExample,
  timeoutMsFrom,
  UsageError,
} from "./cmdline";

const USAGE =
  "usage: node dist/example.js --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]\n" +
  "       [--aligned] [--steps N] [--timeout SECONDS]\n" +
  "       [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--token-file FILE] INPUT_IMAGE OUTPUT_IMAGE\n" +
  "       node dist/example.js --batch --server HOST:PORT [options as above] INPUT_IMAGE... OUTPUT_DIR";

interface Args extends CommonArgs {
  /** Every field but requestId and image. */
  template: Omit<AnonymizeRequest, "requestId" | "image">;
  batch: boolean;
  inputs: string[];
  /** The output image, or with --batch the output directory. */
  output: string;
}

function parseArgs(argv: string[]): Args {
  const { values, positionals } = parseCommandLine(argv, USAGE, "300", {
    aligned: { type: "boolean", default: false },
    steps: { type: "string" },
    batch: { type: "boolean", default: false },
  });
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
  const method = methodFrom(values.method);
  const steps = values.steps === undefined ? undefined : Number(values.steps);
  if (steps !== undefined && !(Number.isInteger(steps) && steps > 0)) throw new UsageError(`--steps ${values.steps}: use a positive integer`);
  const timeoutMs = timeoutMsFrom(values.timeout);
  const connection = connectionFrom(values);

  // fromPartial: fields the proto gains later (priority, ...) take their defaults.
  const { requestId: _id, image: _image, ...template } = AnonymizeRequest.fromPartial({
    method,
    params: steps === undefined ? undefined : ReversePersonalizationParams.fromPartial({ steps }),
    detection: values.aligned ? DetectionOptions.fromPartial({ aligned: true }) : undefined,
  });
  return {
    server: values.server,
    template,
    timeoutMs,
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

async function run(client: MasqueradeClient, args: Args): Promise<number> {
  if (args.batch) return await runBatch(client, args);
  const request: AnonymizeRequest = { ...args.template, requestId: "", image: readFileSync(args.inputs[0]) };
  const result = await client.anonymize(request, (event) => console.log(describe(event)));
  writeFileSync(args.output, result.image);
  return 0;
}

runExample(USAGE, parseArgs, run);
