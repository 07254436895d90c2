// masquerade-video: sends one video file through AnonymizeVideo, prints each progress
// event as it arrives, writes the anonymized file (through a partial file renamed at
// the end, so a failed call leaves nothing) and prints one line per track, then the
// report. With --frames, sends images as the frames of one live AnonymizeFrames stream
// (at most --window in flight), prints one line per covered frame, in order, and writes
// each to OUTDIR/<file name>.
// Exit codes: 0 done; 3 INVALID_ARGUMENT (a bad, truncated or oversized file; with
// --frames: some frame could not be read); 2 bad command line; 1 any other failure.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { parseArgs } from "node:util";
import {
  type FrameStreamOptions,
  type LiveFrame,
  MasqueradeClient,
  type MasqueradeClientOptions,
  MasqueradeError,
  Method,
  faceStatusToJSON,
  methodToJSON,
  status,
  statusName,
  type VideoStart,
} from "./client";

const USAGE =
  "usage: node dist/video-example.js --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]\n" +
  "       [--detect-every K] [--codec h264|hevc|vp9|av1] [--crf N] [--no-audio] [--keep-metadata] [--timeout SECONDS]\n" +
  "       [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--token-file FILE] INPUT_VIDEO OUTPUT_VIDEO\n" +
  "       node dist/video-example.js --frames [--window N] [--fps F] --server HOST:PORT [options as above] IMAGE... OUTPUT_DIR";

const METHODS: Record<string, Method> = {
  reverse_personalization: Method.REVERSE_PERSONALIZATION,
  blur: Method.BLUR,
  pixelate: Method.PIXELATE,
  solid: Method.SOLID,
};

class UsageError extends Error {}

interface Args {
  server: string;
  method: Method;
  detectEvery?: number;
  codec: string;
  crf?: number;
  noAudio: boolean;
  keepMetadata: boolean;
  timeoutMs: number;
  connection: MasqueradeClientOptions;
  frames: boolean;
  window?: number;
  /** --frames: the images' capture times are sequence / fps (files carry none; the tracker needs them). */
  fps: number;
  inputs: string[];
  output: string;
}

function positiveInteger(flag: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!(Number.isInteger(value) && value > 0)) throw new UsageError(`${flag} ${text}: use a positive integer`);
  return value;
}

function positiveNumber(flag: string, text: string): number {
  const value = Number(text);
  if (!(value > 0 && Number.isFinite(value))) throw new UsageError(`${flag} ${text}: use a positive number`);
  return value;
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
        "detect-every": { type: "string" },
        codec: { type: "string", default: "" },
        crf: { type: "string" },
        "no-audio": { type: "boolean", default: false },
        "keep-metadata": { type: "boolean", default: false },
        timeout: { type: "string", default: "600" },
        frames: { type: "boolean", default: false },
        window: { type: "string" },
        fps: { type: "string", default: "12" },
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
  if (values.frames ? positionals.length < 2 : positionals.length !== 2) {
    throw new UsageError(values.frames ? "--frames: expected IMAGE... OUTPUT_DIR" : "expected INPUT_VIDEO and OUTPUT_VIDEO");
  }
  const method = values.method === undefined ? Method.METHOD_UNSPECIFIED : METHODS[values.method];
  if (method === undefined) throw new UsageError(`--method ${values.method}: use one of ${Object.keys(METHODS).join(", ")}`);
  const timeoutSeconds = Number(values.timeout);
  if (!(timeoutSeconds > 0)) throw new UsageError(`--timeout ${values.timeout}: use a positive number of seconds`);
  const crf = values.crf === undefined ? undefined : Number(values.crf);
  if (crf !== undefined && !(Number.isInteger(crf) && crf >= 0)) throw new UsageError(`--crf ${values.crf}: use an integer >= 0`);
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
  return {
    server: values.server,
    method,
    detectEvery: positiveInteger("--detect-every", values["detect-every"]),
    codec: values.codec,
    crf,
    noAudio: values["no-audio"],
    keepMetadata: values["keep-metadata"],
    timeoutMs: timeoutSeconds * 1000,
    connection: { tls: values.tls, caFile: values["tls-ca"], certFile: values["tls-cert"], keyFile: values["tls-key"], token },
    frames: values.frames,
    window: positiveInteger("--window", values.window),
    fps: positiveNumber("--fps", values.fps),
    inputs: positionals.slice(0, -1),
    output: positionals[positionals.length - 1],
  };
}

async function runVideo(client: MasqueradeClient, args: Args): Promise<number> {
  const start: Partial<VideoStart> = {
    method: args.method,
    tracking: args.detectEvery === undefined ? undefined : { detectEvery: args.detectEvery },
    output: { codec: args.codec, crf: args.crf, dropAudio: args.noAudio, keepMetadata: args.keepMetadata, reportFrames: false },
  };
  const { report } = await client.anonymizeVideo(args.inputs[0], start, {
    outputPath: args.output,
    onProgress: (p) => console.log(`progress frames=${p.framesDone}/${p.framesTotal} fps=${p.fps.toFixed(1)} tracks=${p.tracks}`),
  });
  for (const t of report.tracks) {
    console.log(
      `track id=${t.trackId} frames=${t.firstFrame}-${t.lastFrame} detected=${t.framesDetected} filled=${t.framesFilled} ` +
        `method=${methodToJSON(t.methodApplied)} status=${faceStatusToJSON(t.status)}`,
    );
  }
  console.log(`report frames=${report.frames} tracks=${report.tracks.length} complete=${report.complete} bytes=${report.outputBytes}`);
  return 0;
}

/** --frames: each image is one frame of a live stream (a camera gateway would pass its camera's frames). */
async function runFrames(client: MasqueradeClient, args: Args): Promise<number> {
  mkdirSync(args.output, { recursive: true });
  function* frames(): Generator<LiveFrame> {
    // Read only when the window has room; stamped as a camera would stamp them (capture time, not send time).
    for (const [index, input] of args.inputs.entries()) yield { encoded: readFileSync(input), timestamp: index / args.fps };
  }
  const options: Partial<FrameStreamOptions> = {
    method: args.method,
    window: args.window,
    tracking: args.detectEvery === undefined ? undefined : { detectEvery: args.detectEvery },
  };
  let invalid = false;
  for await (const frame of client.anonymizeFrames(frames(), options)) {
    const name = basename(args.inputs[frame.sequence]);
    if (frame.error !== undefined) {
      console.log(`frame seq=${frame.sequence} error=${statusName(frame.error.code)}: ${frame.error.message}`);
      invalid = true;
      continue;
    }
    const tracks = frame.faces.map((face) => `${face.trackId}${face.detected ? "" : "h"}`).join(",");
    const pixels = frame.pixels?.$case === "encoded" ? frame.pixels.value : frame.pixels?.value.rgb;
    console.log(
      `frame seq=${frame.sequence} faces=${frame.faces.length} tracks=[${tracks}] detector_ran=${frame.detectorRan} ` +
        `latency_ms=${(frame.latencySeconds * 1000).toFixed(1)} bytes=${pixels?.length ?? 0}`,
    );
    if (frame.pixels?.$case === "encoded") writeFileSync(join(args.output, name), frame.pixels.value);
  }
  return invalid ? 3 : 0;
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
    console.error(`error: ${(err as Error).message}`);
    return 2;
  }
  try {
    return args.frames ? await runFrames(client, args) : await runVideo(client, args);
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
