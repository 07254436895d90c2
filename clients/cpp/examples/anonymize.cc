// masquerade-anonymize: sends one image through AnonymizeStream, prints each
// event as it arrives and writes the anonymized image. With --batch, sends every
// input over one AnonymizeBatch stream (request_id = the input's file name), prints
// one line per response as it arrives and writes each result to OUTPUT_DIR/<file name>.
// Exit codes: 0 done (with --batch: every image); 3 INVALID_ARGUMENT (the gRPC code
// number; with --batch: some image was, and nothing failed otherwise); 2 bad command
// line; 1 any other failure.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <set>
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
    "usage: masquerade-anonymize --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]\n"
    "       [--aligned] [--steps N] [--timeout SECONDS]\n"
    "       [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--token-file FILE] INPUT_IMAGE OUTPUT_IMAGE\n"
    "       masquerade-anonymize --batch --server HOST:PORT [options as above] INPUT_IMAGE... OUTPUT_DIR";

struct Args : masquerade::cmdline::CommonArgs {
  Args() : CommonArgs(300) {}
  bool aligned = false;
  std::optional<unsigned> steps;
  bool batch = false;
  std::vector<std::string> inputs;
  std::string output;  // the output image, or with --batch the output directory
};

// The request_id and output name of an input in --batch mode.
std::string FileName(const std::string& path) { return std::filesystem::path(path).filename().string(); }

Args ParseArgs(int argc, char** argv) {
  Args args;
  std::vector<std::string> positional =
      masquerade::cmdline::ParseCommandLine(argc, argv, kUsage, args, [&](const std::string& flag, const auto& value) {
        if (flag == "--batch") {
          args.batch = true;
        } else if (flag == "--aligned") {
          args.aligned = true;
        } else if (flag == "--steps") {
          args.steps = masquerade::cmdline::ParseUnsigned(flag, value(), 1, "a positive integer");
        } else {
          return false;
        }
        return true;
      });
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

int Run(const Args& args, const masquerade::cmdline::Connection& connection) {
  if (args.batch) {
    masquerade::Client client(args.server, connection.options, connection.credentials);
    return RunBatch(client, args);
  }
  const v1::AnonymizeRequest request = NewRequest(args, "", ReadFile(args.inputs[0]));
  masquerade::Client client(args.server, connection.options, connection.credentials);
  const v1::AnonymizeResponse result = client.AnonymizeStream(
      request, [](const v1::AnonymizeEvent& event) { std::cout << Describe(event) << std::endl; });
  WriteFile(args.output, result.image());
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return masquerade::cmdline::Main(argc, argv, kUsage, ParseArgs, Run); }
