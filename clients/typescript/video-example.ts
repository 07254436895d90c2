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
import {
  type FrameStreamOptions,
  type LiveFrame,
  type MasqueradeClient,
  type Method,
  faceStatusToJSON,
  methodToJSON,
  statusName,
  type VideoStart,
} from "./client";
import { type CommonArgs, connectionFrom, methodFrom, parseCommandLine, runExample, timeoutMsFrom, UsageError } from "./cmdline";

const USAGE =
  "usage: node dist/video-example.js --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]\n" +
  "       [--detect-every K] [--codec h264|hevc|vp9|av1] [--crf N] [--no-audio] [--keep-metadata] [--timeout SECONDS]\n" +
  "       [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--token-file FILE] INPUT_VIDEO OUTPUT_VIDEO\n" +
  "       node dist/video-example.js --frames [--window N] [--fps F] --server HOST:PORT [options as above] IMAGE... OUTPUT_DIR";

interface Args extends CommonArgs {
  method: Method;
  detectEvery?: number;
  codec: string;
  crf?: number;
  noAudio: boolean;
  keepMetadata: boolean;
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

function parseArgs(argv: string[]): Args {
  const { values, positionals } = parseCommandLine(argv, USAGE, "600", {
    "detect-every": { type: "string" },
    codec: { type: "string", default: "" },
    crf: { type: "string" },
    "no-audio": { type: "boolean", default: false },
    "keep-metadata": { type: "boolean", default: false },
    frames: { type: "boolean", default: false },
    window: { type: "string" },
    fps: { type: "string", default: "12" },
  });
  if (values.frames ? positionals.length < 2 : positionals.length !== 2) {
    throw new UsageError(values.frames ? "--frames: expected IMAGE... OUTPUT_DIR" : "expected INPUT_VIDEO and OUTPUT_VIDEO");
  }
  const method = methodFrom(values.method);
  const timeoutMs = timeoutMsFrom(values.timeout);
  const crf = values.crf === undefined ? undefined : Number(values.crf);
  if (crf !== undefined && !(Number.isInteger(crf) && crf >= 0)) throw new UsageError(`--crf ${values.crf}: use an integer >= 0`);
  const connection = connectionFrom(values);
  return {
    server: values.server,
    method,
    detectEvery: positiveInteger("--detect-every", values["detect-every"]),
    codec: values.codec,
    crf,
    noAudio: values["no-audio"],
    keepMetadata: values["keep-metadata"],
    timeoutMs,
    connection,
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

runExample(USAGE, parseArgs, (client, args) => (args.frames ? runFrames(client, args) : runVideo(client, args)));
