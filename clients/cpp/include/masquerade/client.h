// A thin C++ client for the Masquerade anonymization server, over the stub that
// the CMake build generates from proto/: one deadline per call across all its
// attempts, retries of UNAVAILABLE with exponential backoff before any response
// arrived, and masquerade::RpcError thrown for every failure.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "masquerade/v1/anonymizer.grpc.pb.h"

namespace masquerade {

namespace v1 = ::masquerade::v1;

// A failed call: the gRPC status the server (or the channel) answered with.
class RpcError : public std::runtime_error {
 public:
  RpcError(grpc::StatusCode code, const std::string& message);
  explicit RpcError(const grpc::Status& status) : RpcError(status.error_code(), status.error_message()) {}

  grpc::StatusCode code() const noexcept { return code_; }
  // The canonical name of the code, e.g. "INVALID_ARGUMENT".
  const char* code_name() const noexcept;
  // The server's message, e.g. "image: not a decodable JPEG, PNG or WebP".
  const std::string& message() const noexcept { return message_; }
  grpc::Status status() const { return grpc::Status(code_, message_); }

 private:
  grpc::StatusCode code_;
  std::string message_;
};

// "INVALID_ARGUMENT" for grpc::StatusCode::INVALID_ARGUMENT, as in the gRPC spec.
const char* CodeName(grpc::StatusCode code) noexcept;

struct ClientOptions {
  // Deadline of each call, all attempts together.
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};
  int max_attempts = 4;  // the first attempt included
  std::chrono::milliseconds initial_backoff{200};  // doubled per retry
  std::chrono::milliseconds max_backoff{5000};
};

class Client {
 public:
  using EventCallback = std::function<void(const v1::AnonymizeEvent&)>;
  using BatchCallback = std::function<void(const v1::AnonymizeBatchResponse&)>;

  // Plaintext by default, as the server listens on loopback or behind a proxy.
  explicit Client(const std::string& target, ClientOptions options = {},
                  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials());

  // Sends one image through AnonymizeStream, passes every event (queued, faces
  // found, progress, result) to on_event as it arrives and returns the result.
  // Throws RpcError; an exception from on_event cancels the call and propagates.
  v1::AnonymizeResponse AnonymizeStream(const v1::AnonymizeRequest& request, const EventCallback& on_event = {});

  // Sends requests over one AnonymizeBatch stream and passes each response to
  // on_response as it arrives, in completion order, not submission order: match
  // them by request_id, which every request must set, unique among the requests
  // in flight. A request the server rejects is a response with error() set
  // (code() is a grpc::StatusCode number); the stream goes on. A writer thread
  // sends the requests while this thread reads, so flow control cannot deadlock
  // however many and large they are; the write side is closed after the last one.
  // One deadline (options.timeout) covers the whole stream; never retried, as the
  // server may already run what was sent. Throws RpcError when the call fails; an
  // exception from on_response cancels the call (and every request still running
  // on it) and propagates. on_response runs on the calling thread.
  void AnonymizeBatch(const std::vector<v1::AnonymizeRequest>& requests, const BatchCallback& on_response);

  // Version, methods available, models loaded, limits and defaults.
  v1::ServerInfo GetServerInfo();

  // The generated stub, for calls this wrapper does not cover.
  v1::Anonymizer::Stub& raw() { return *stub_; }

 private:
  // Sleeps before the next attempt and returns true, or returns false when status is final.
  bool BackoffBeforeRetry(const grpc::Status& status, int attempt, std::chrono::system_clock::time_point deadline);

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Anonymizer::Stub> stub_;
};

}  // namespace masquerade
