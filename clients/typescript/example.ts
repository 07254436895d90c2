// masquerade-anonymize: sends one image through AnonymizeStream, prints each event
// as it arrives and writes the anonymized image.
// Exit codes: 0 done; 3 INVALID_ARGUMENT (the gRPC code number); 2 bad command line; 1 any other failure.
import { readFileSync, writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import {
  type AnonymizeEvent,
  type AnonymizeRequest,
  MasqueradeClient,
  MasqueradeError,
  Method,
  phaseToJSON,
  status,
} from "./client";

const USAGE =
  "usage: node dist/example.js --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]\n" +
  "       [--aligned] [--steps N] [--timeout SECONDS] INPUT_IMAGE OUTPUT_IMAGE";

const METHODS: Record<string, Method> = {
  reverse_personalization: Method.REVERSE_PERSONALIZATION,
  blur: Method.BLUR,
  pixelate: Method.PIXELATE,
  solid: Method.SOLID,
};

class UsageError extends Error {}

interface Args {
  server: string;
  request: AnonymizeRequest;
  timeoutMs: number;
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
  if (positionals.length !== 2) throw new UsageError("expected INPUT_IMAGE and OUTPUT_IMAGE");
  const method = values.method === undefined ? Method.METHOD_UNSPECIFIED : METHODS[values.method];
  if (method === undefined) throw new UsageError(`--method ${values.method}: use one of ${Object.keys(METHODS).join(", ")}`);
  const steps = values.steps === undefined ? undefined : Number(values.steps);
  if (steps !== undefined && !(Number.isInteger(steps) && steps > 0)) throw new UsageError(`--steps ${values.steps}: use a positive integer`);
  const timeoutSeconds = Number(values.timeout);
  if (!(timeoutSeconds > 0)) throw new UsageError(`--timeout ${values.timeout}: use a positive number of seconds`);

  const [input, output] = positionals;
  const request: AnonymizeRequest = {
    requestId: "",
    image: readFileSync(input),
    method,
    params: steps === undefined ? undefined : { steps },
    detection: values.aligned ? { aligned: true } : undefined,
  };
  return { server: values.server, request, timeoutMs: timeoutSeconds * 1000, output };
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

async function main(): Promise<number> {
  let args: Args;
  try {
    args = parseCommandLine(process.argv.slice(2));
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`error: ${err.message}\n${USAGE}`);
    return 2;
  }
  const client = new MasqueradeClient(args.server, { timeoutMs: args.timeoutMs });
  try {
    const result = await client.anonymize(args.request, (event) => console.log(describe(event)));
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
