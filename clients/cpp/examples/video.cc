// masquerade-video: sends one video file through AnonymizeVideo, prints each progress
// event as it arrives, writes the anonymized file (through a partial file renamed at the
// end, so a failed call leaves nothing) and prints one line per track, then the report.
// With --frames, sends images as the frames of one live AnonymizeFrames stream (at most
// --window in flight), prints one line per covered frame, in order, and writes each to
// OUTPUT_DIR/<file name>.
// Exit codes: 0 done; 3 INVALID_ARGUMENT (a bad, truncated or oversized file; with
// --frames: some frame could not be read); 2 bad command line; 1 any other failure.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "masquerade/client.h"

namespace {

namespace v1 = masquerade::v1;

constexpr const char* kUsage =
    "usage: masquerade-video --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]\n"
    "       [--detect-every K] [--codec h264|hevc|vp9|av1] [--crf N] [--no-audio] [--keep-metadata] [--timeout SECONDS]\n"
    "       [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--token-file FILE] INPUT_VIDEO OUTPUT_VIDEO\n"
    "       masquerade-video --frames [--window N] [--fps F] --server HOST:PORT [options as above] IMAGE... OUTPUT_DIR";

const std::map<std::string, v1::Method> kMethods = {
    {"reverse_personalization", v1::REVERSE_PERSONALIZATION},
    {"blur", v1::BLUR},
    {"pixelate", v1::PIXELATE},
    {"solid", v1::SOLID},
};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string server;
  v1::Method method = v1::METHOD_UNSPECIFIED;
  std::optional<unsigned> detect_every, crf, window;
  std::string codec;
  bool no_audio = false, keep_metadata = false, frames = false, tls = false;
  double timeout_seconds = 600;
  double fps = 12;  // --frames: the images' capture times are sequence / fps (files carry none)
  std::string tls_ca, tls_cert, tls_key, token_file;
  std::vector<std::string> inputs;
  std::string output;
};

unsigned Unsigned(const std::string& flag, const std::string& text, unsigned minimum) {
  try {
    size_t used = 0;
    const long value = std::stol(text, &used);
    if (used == text.size() && value >= static_cast<long>(minimum)) return static_cast<unsigned>(value);
  } catch (const std::exception&) {
  }
  throw UsageError(flag + " " + text + ": use an integer >= " + std::to_string(minimum));
}

Args ParseArgs(int argc, char** argv) {
  Args args;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::optional<std::string> inline_value;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      inline_value = arg.substr(arg.find('=') + 1);
      arg = arg.substr(0, arg.find('='));
    }
    auto value = [&]() -> std::string {
      if (inline_value) return *inline_value;
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage << "\n";
      std::exit(0);
    } else if (arg == "--server") {
      args.server = value();
    } else if (arg == "--method") {
      const std::string name = value();
      const auto found = kMethods.find(name);
      if (found == kMethods.end()) throw UsageError("--method " + name + ": use one of blur, pixelate, solid, reverse_personalization");
      args.method = found->second;
    } else if (arg == "--detect-every") {
      args.detect_every = Unsigned(arg, value(), 1);
    } else if (arg == "--codec") {
      args.codec = value();
    } else if (arg == "--crf") {
      args.crf = Unsigned(arg, value(), 0);
    } else if (arg == "--no-audio") {
      args.no_audio = true;
    } else if (arg == "--keep-metadata") {
      args.keep_metadata = true;
    } else if (arg == "--frames") {
      args.frames = true;
    } else if (arg == "--window") {
      args.window = Unsigned(arg, value(), 1);
    } else if (arg == "--fps") {
      const std::string text = value();
      try {
        args.fps = std::stod(text);
      } catch (const std::exception&) {
        args.fps = -1;
      }
      if (!(args.fps > 0)) throw UsageError("--fps " + text + ": use a positive number");
    } else if (arg == "--tls") {
      args.tls = true;
    } else if (arg == "--tls-ca") {
      args.tls_ca = value();
    } else if (arg == "--tls-cert") {
      args.tls_cert = value();
    } else if (arg == "--tls-key") {
      args.tls_key = value();
    } else if (arg == "--token-file") {
      args.token_file = value();
    } else if (arg == "--timeout") {
      const std::string text = value();
      try {
        args.timeout_seconds = std::stod(text);
      } catch (const std::exception&) {
        args.timeout_seconds = -1;
      }
      if (!(args.timeout_seconds > 0)) throw UsageError("--timeout " + text + ": use a positive number of seconds");
    } else if (arg.rfind("--", 0) == 0) {
      throw UsageError("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (args.server.empty()) throw UsageError("--server HOST:PORT is required");
  if (args.tls_cert.empty() != args.tls_key.empty()) {
    throw UsageError("--tls-cert and --tls-key: give both (mutual TLS) or neither");
  }
  if (args.frames ? positional.size() < 2 : positional.size() != 2) {
    throw UsageError(args.frames ? "--frames: expected IMAGE... OUTPUT_DIR" : "expected INPUT_VIDEO and OUTPUT_VIDEO");
  }
  args.output = positional.back();
  positional.pop_back();
  args.inputs = std::move(positional);
  return args;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The first non-empty line of the token file.
std::string ReadToken(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UsageError("--token-file: cannot read " + path);
  for (std::string line; std::getline(in, line);) {
    const auto begin = line.find_first_not_of(" \t\r");
    if (begin == std::string::npos) continue;
    return line.substr(begin, line.find_last_not_of(" \t\r") - begin + 1);
  }
  throw UsageError("--token-file " + path + ": the file holds no token");
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

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = ParseArgs(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "error: " << e.what() << "\n" << kUsage << "\n";
    return 2;
  }
  masquerade::ClientOptions options;
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  try {
    options.timeout = std::chrono::milliseconds(static_cast<long long>(args.timeout_seconds * 1000));
    options.tls = args.tls;
    options.ca_file = args.tls_ca;
    options.cert_file = args.tls_cert;
    options.key_file = args.tls_key;
    if (!args.token_file.empty()) options.token = ReadToken(args.token_file);
    credentials = masquerade::ChannelCredentialsFor(options);  // reads the PEM files now
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  try {
    masquerade::Client client(args.server, options, credentials);
    return args.frames ? RunFrames(client, args) : RunVideo(client, args);
  } catch (const masquerade::RpcError& e) {
    std::cerr << "error: " << e.code_name() << ": " << e.message() << "\n";
    return e.code() == grpc::StatusCode::INVALID_ARGUMENT ? 3 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
