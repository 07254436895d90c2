// masquerade-video: sends one video file through AnonymizeVideo, prints each progress
// event as it arrives, writes the anonymized file (through a partial file renamed at the
// end, so a failed call leaves nothing) and prints one line per track, then the report.
// With --frames, sends images as the frames of one live AnonymizeFrames stream (at most
// --window in flight), prints one line per covered frame, in order, and writes each to
// OUTPUT_DIR/<file name>.
// Exit codes: 0 done; 3 INVALID_ARGUMENT (a bad, truncated or oversized file; with
// --frames: some frame could not be read); 2 bad command line; 1 any other failure.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cmdline.h"
#include "masquerade/client.h"

namespace {

namespace v1 = masquerade::v1;
using masquerade::cmdline::ReadFile;
using masquerade::cmdline::UsageError;

constexpr const char* kUsage =
    "usage: masquerade-video --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]\n"
    "       [--detect-every K] [--codec h264|hevc|vp9|av1] [--crf N] [--no-audio] [--keep-metadata] [--timeout SECONDS]\n"
    "       [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--token-file FILE] INPUT_VIDEO OUTPUT_VIDEO\n"
    "       masquerade-video --frames [--window N] [--fps F] --server HOST:PORT [options as above] IMAGE... OUTPUT_DIR";

struct Args : masquerade::cmdline::CommonArgs {
  Args() : CommonArgs(600) {}
  std::optional<unsigned> detect_every, crf, window;
  std::string codec;
  bool no_audio = false, keep_metadata = false, frames = false;
  double fps = 12;  // --frames: the images' capture times are sequence / fps (files carry none)
  std::vector<std::string> inputs;
  std::string output;
};

Args ParseArgs(int argc, char** argv) {
  using masquerade::cmdline::ParseUnsigned;
  Args args;
  std::vector<std::string> positional =
      masquerade::cmdline::ParseCommandLine(argc, argv, kUsage, args, [&](const std::string& flag, const auto& value) {
        if (flag == "--detect-every") {
          args.detect_every = ParseUnsigned(flag, value(), 1);
        } else if (flag == "--codec") {
          args.codec = value();
        } else if (flag == "--crf") {
          args.crf = ParseUnsigned(flag, value(), 0);
        } else if (flag == "--no-audio") {
          args.no_audio = true;
        } else if (flag == "--keep-metadata") {
          args.keep_metadata = true;
        } else if (flag == "--frames") {
          args.frames = true;
        } else if (flag == "--window") {
          args.window = ParseUnsigned(flag, value(), 1);
        } else if (flag == "--fps") {
          args.fps = masquerade::cmdline::ParsePositive(flag, value());
        } else {
          return false;
        }
        return true;
      });
  if (args.frames ? positional.size() < 2 : positional.size() != 2) {
    throw UsageError(args.frames ? "--frames: expected IMAGE... OUTPUT_DIR" : "expected INPUT_VIDEO and OUTPUT_VIDEO");
  }
  args.output = positional.back();
  positional.pop_back();
  args.inputs = std::move(positional);
  return args;
}

int RunVideo(masquerade::Client& client, const Args& args) {
  v1::VideoStart start;
  start.set_method(args.method);
  if (args.detect_every) start.mutable_tracking()->set_detect_every(*args.detect_every);
  auto& output_options = *start.mutable_output();
  output_options.set_codec(args.codec);
  if (args.crf) output_options.set_crf(*args.crf);
  output_options.set_drop_audio(args.no_audio);
  output_options.set_keep_metadata(args.keep_metadata);

  const std::string partial = args.output + ".partial";
  v1::VideoReport report;
  try {
    std::ofstream output(partial, std::ios::binary | std::ios::trunc);
    if (!output) throw std::runtime_error("cannot write " + partial);
    report = client.AnonymizeVideo(start, args.inputs[0], output, [](const v1::VideoProgress& p) {
      std::cout << "progress frames=" << p.frames_done() << "/" << p.frames_total() << " fps=" << std::fixed
                << std::setprecision(1) << p.fps() << " tracks=" << p.tracks() << std::endl;
    });
    if (!output.flush()) throw std::runtime_error("cannot write " + partial);
    output.close();
    std::filesystem::rename(partial, args.output);
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(partial, ignored);  // a failed call leaves no file behind
    throw;
  }
  for (const auto& t : report.tracks()) {
    std::cout << "track id=" << t.track_id() << " frames=" << t.first_frame() << "-" << t.last_frame()
              << " detected=" << t.frames_detected() << " filled=" << t.frames_filled()
              << " method=" << v1::Method_Name(t.method_applied()) << " status=" << v1::FaceStatus_Name(t.status())
              << "\n";
  }
  std::cout << "report frames=" << report.frames() << " tracks=" << report.tracks_size()
            << " complete=" << (report.complete() ? "true" : "false") << " bytes=" << report.output_bytes() << std::endl;
  return 0;
}

// --frames: each image is one frame of a live stream (a camera gateway would pass its camera's frames).
int RunFrames(masquerade::Client& client, const Args& args) {
  std::filesystem::create_directories(args.output);
  v1::FrameStreamOptions options;
  options.set_method(args.method);
  if (args.window) options.set_window(*args.window);
  if (args.detect_every) options.mutable_tracking()->set_detect_every(*args.detect_every);
  size_t next = 0;
  bool invalid = false;
  client.AnonymizeFrames(
      options,
      [&](v1::FrameRequest& frame) {
        if (next == args.inputs.size()) return false;
        // Read only when the window has room; stamped as a camera would stamp them (capture, not send, time).
        frame.set_timestamp(static_cast<double>(next) / args.fps);
        frame.set_encoded(ReadFile(args.inputs[next++]));
        return true;
      },
      [&](const v1::FrameResult& frame) {
        if (frame.has_error()) {
          std::cout << "frame seq=" << frame.sequence()
                    << " error=" << masquerade::CodeName(static_cast<grpc::StatusCode>(frame.error().code())) << ": "
                    << frame.error().message() << std::endl;
          invalid = true;
          return;
        }
        std::ostringstream tracks;
        for (int i = 0; i < frame.faces_size(); ++i) {
          tracks << (i ? "," : "") << frame.faces(i).track_id() << (frame.faces(i).detected() ? "" : "h");
        }
        const size_t bytes = frame.has_raw() ? frame.raw().rgb().size() : frame.encoded().size();
        std::cout << "frame seq=" << frame.sequence() << " faces=" << frame.faces_size() << " tracks=[" << tracks.str()
                  << "] detector_ran=" << (frame.detector_ran() ? "true" : "false") << " latency_ms=" << std::fixed
                  << std::setprecision(1) << frame.latency_seconds() * 1000 << " bytes=" << bytes << std::endl;
        if (!frame.has_raw()) {
          const auto name = std::filesystem::path(args.inputs.at(frame.sequence())).filename();
          std::ofstream out(std::filesystem::path(args.output) / name, std::ios::binary);
          out.write(frame.encoded().data(), static_cast<std::streamsize>(frame.encoded().size()));
          if (!out.flush()) throw std::runtime_error("cannot write " + (std::filesystem::path(args.output) / name).string());
        }
      });
  return invalid ? 3 : 0;
}

int Run(const Args& args, const masquerade::cmdline::Connection& connection) {
  masquerade::Client client(args.server, connection.options, connection.credentials);
  return args.frames ? RunFrames(client, args) : RunVideo(client, args);
}

}  // namespace

int main(int argc, char** argv) { return masquerade::cmdline::Main(argc, argv, kUsage, ParseArgs, Run); }
