// masquerade-anonymize: sends one image through AnonymizeStream, prints each
// event as it arrives and writes the anonymized image. With --batch, sends every
// input over one AnonymizeBatch stream (request_id = the input's file name), prints
// one line per response as it arrives and writes each result to OUTPUT_DIR/<file name>.
// Exit codes: 0 done (with --batch: every image); 3 INVALID_ARGUMENT (the gRPC code
// number; with --batch: some image was, and nothing failed otherwise); 2 bad command
// line; 1 any other failure.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "masquerade/client.h"

namespace {

namespace v1 = masquerade::v1;

constexpr const char* kUsage =
    "usage: masquerade-anonymize --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]\n"
    "       [--aligned] [--steps N] [--timeout SECONDS]\n"
    "       [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--token-file FILE] INPUT_IMAGE OUTPUT_IMAGE\n"
    "       masquerade-anonymize --batch --server HOST:PORT [options as above] INPUT_IMAGE... OUTPUT_DIR";

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
  bool aligned = false;
  std::optional<unsigned> steps;
  double timeout_seconds = 300;
  bool batch = false;
  bool tls = false;
  std::string tls_ca, tls_cert, tls_key, token_file;
  std::vector<std::string> inputs;
  std::string output;  // the output image, or with --batch the output directory
};

// The request_id and output name of an input in --batch mode.
std::string FileName(const std::string& path) { return std::filesystem::path(path).filename().string(); }

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
    } else if (arg == "--batch") {
      args.batch = true;
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
    } else if (arg == "--aligned") {
      args.aligned = true;
    } else if (arg == "--steps") {
      const std::string text = value();
      try {
        size_t used = 0;
        const long steps = std::stol(text, &used);
        if (used != text.size() || steps <= 0) throw std::invalid_argument(text);
        args.steps = static_cast<unsigned>(steps);
      } catch (const std::exception&) {
        throw UsageError("--steps " + text + ": use a positive integer");
      }
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
  if (args.batch) {
    if (positional.size() < 2) throw UsageError("--batch: expected INPUT_IMAGE... OUTPUT_DIR");
    std::set<std::string> seen;
    for (size_t i = 0; i + 1 < positional.size(); ++i) {
      if (!seen.insert(FileName(positional[i])).second) {
        throw UsageError("--batch: two inputs are named " + FileName(positional[i]) +
                         "; file names are the request ids and output names");
      }
    }
  } else if (positional.size() != 2) {
    throw UsageError("expected INPUT_IMAGE and OUTPUT_IMAGE");
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

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out.flush()) throw std::runtime_error("cannot write " + path);
}

std::string Describe(const v1::AnonymizeEvent& event) {
  std::ostringstream line;
  switch (event.event_case()) {
    case v1::AnonymizeEvent::kQueued:
      line << "queued position=" << event.queued().position();
      break;
    case v1::AnonymizeEvent::kFacesFound:
      line << "faces_found n=" << event.faces_found().boxes_size();
      break;
    case v1::AnonymizeEvent::kProgress:
      line << "progress phase=" << v1::Phase_Name(event.progress().phase()) << " step=" << event.progress().step()
           << "/" << event.progress().total();
      break;
    case v1::AnonymizeEvent::kResult:
      line << "result faces=" << event.result().faces_size()
           << " complete=" << (event.result().complete() ? "true" : "false")
           << " bytes=" << event.result().image().size();
      break;
    default:
      line << "unknown_event";
  }
  return line.str();
}

std::string DescribeBatch(const v1::AnonymizeBatchResponse& response) {
  std::ostringstream line;
  line << "batch id=" << response.request_id();
  switch (response.outcome_case()) {
    case v1::AnonymizeBatchResponse::kResult:
      line << " faces=" << response.result().faces_size() << " complete=" << (response.result().complete() ? "true" : "false")
           << " bytes=" << response.result().image().size();
      break;
    case v1::AnonymizeBatchResponse::kError:
      line << " error=" << masquerade::CodeName(static_cast<grpc::StatusCode>(response.error().code())) << ": "
           << response.error().message();
      break;
    default:
      line << " error=INTERNAL: the response has neither result nor error";
  }
  return line.str();
}

v1::AnonymizeRequest NewRequest(const Args& args, const std::string& id, std::string image) {
  v1::AnonymizeRequest request;
  request.set_request_id(id);
  request.set_image(std::move(image));
  request.set_method(args.method);
  if (args.steps) request.mutable_params()->set_steps(*args.steps);
  if (args.aligned) request.mutable_detection()->set_aligned(true);
  return request;
}

// --batch: returns the exit code; throws RpcError when the call itself fails.
int RunBatch(masquerade::Client& client, const Args& args) {
  std::vector<v1::AnonymizeRequest> requests;
  std::set<std::string> pending;
  for (const std::string& input : args.inputs) {
    requests.push_back(NewRequest(args, FileName(input), ReadFile(input)));
    pending.insert(FileName(input));
  }
  std::filesystem::create_directories(args.output);
  bool invalid = false, failed = false;
  client.AnonymizeBatch(requests, [&](const v1::AnonymizeBatchResponse& response) {
    std::cout << DescribeBatch(response) << std::endl;
    if (pending.erase(response.request_id()) == 0) {
      std::cerr << "error: a response for an unknown or already answered request id \"" << response.request_id() << "\"\n";
      failed = true;
    } else if (response.has_result()) {
      try {
        WriteFile((std::filesystem::path(args.output) / response.request_id()).string(), response.result().image());
      } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << "\n";
        failed = true;
      }
    } else if (response.has_error() && response.error().code() == static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT)) {
      invalid = true;
    } else {
      failed = true;
    }
  });
  for (const std::string& id : pending) {
    std::cerr << "error: no response for request id " << id << "\n";
    failed = true;
  }
  return failed ? 1 : invalid ? 3 : 0;
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
    if (args.batch) {
      masquerade::Client client(args.server, options, credentials);
      return RunBatch(client, args);
    }
    const v1::AnonymizeRequest request = NewRequest(args, "", ReadFile(args.inputs[0]));
    masquerade::Client client(args.server, options, credentials);
    const v1::AnonymizeResponse result = client.AnonymizeStream(
        request, [](const v1::AnonymizeEvent& event) { std::cout << Describe(event) << std::endl; });
    WriteFile(args.output, result.image());
    return 0;
  } catch (const masquerade::RpcError& e) {
    std::cerr << "error: " << e.code_name() << ": " << e.message() << "\n";
    return e.code() == grpc::StatusCode::INVALID_ARGUMENT ? 3 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
