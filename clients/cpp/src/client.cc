#include "masquerade/client.h"

#include <algorithm>
#include <random>
#include <thread>

namespace masquerade {

RpcError::RpcError(grpc::StatusCode code, const std::string& message)
    : std::runtime_error(std::string(CodeName(code)) + ": " + message), code_(code), message_(message) {}

const char* RpcError::code_name() const noexcept { return CodeName(code_); }

const char* CodeName(grpc::StatusCode code) noexcept {
  static const char* const kNames[] = {
      "OK",        "CANCELLED",         "UNKNOWN",           "INVALID_ARGUMENT",  "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",      "UNAVAILABLE",       "DATA_LOSS",         "UNAUTHENTICATED",
  };
  const int index = static_cast<int>(code);
  return index >= 0 && index < static_cast<int>(std::size(kNames)) ? kNames[index] : "UNKNOWN";
}

Client::Client(const std::string& target, ClientOptions options, std::shared_ptr<grpc::ChannelCredentials> credentials)
    : options_(options) {
  grpc::ChannelArguments args;
  // Results are whole encoded images, larger than gRPC's 4 MiB default; 64 MiB matches the server.
  args.SetMaxReceiveMessageSize(64 << 20);
  channel_ = grpc::CreateCustomChannel(target, std::move(credentials), args);
  stub_ = v1::Anonymizer::NewStub(channel_);
}

v1::AnonymizeResponse Client::AnonymizeStream(const v1::AnonymizeRequest& request, const EventCallback& on_event) {
  const auto deadline = std::chrono::system_clock::now() + options_.timeout;
  for (int attempt = 1;; ++attempt) {
    grpc::ClientContext context;
    context.set_deadline(deadline);
    auto reader = stub_->AnonymizeStream(&context, request);
    v1::AnonymizeEvent event;
    v1::AnonymizeResponse result;
    bool received = false, has_result = false;
    while (reader->Read(&event)) {
      received = true;
      if (on_event) {
        try {
          on_event(event);
        } catch (...) {
          context.TryCancel();  // frees the server's slot
          reader->Finish();
          throw;
        }
      }
      if (event.has_result()) {
        result = std::move(*event.mutable_result());
        has_result = true;
      }
    }
    const grpc::Status status = reader->Finish();
    if (status.ok()) {
      if (!has_result) throw RpcError(grpc::StatusCode::INTERNAL, "the stream ended without a result event");
      return result;
    }
    // Once an event arrived the server has the job; a retry would run it twice.
    if (received || !BackoffBeforeRetry(status, attempt, deadline)) throw RpcError(status);
  }
}

void Client::AnonymizeBatch(const std::vector<v1::AnonymizeRequest>& requests, const BatchCallback& on_response) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + options_.timeout);
  const auto stream = stub_->AnonymizeBatch(&context);
  // Write blocks under flow control while the server waits for its responses to
  // be read, so writing runs beside the reads below. Write and WritesDone fail
  // once the call has ended (its status says why); the writer then just stops.
  std::thread writer([&requests, &stream] {
    for (const v1::AnonymizeRequest& request : requests) {
      if (!stream->Write(request)) return;
    }
    stream->WritesDone();
  });
  // Ends the call (a no-op once it has ended), which unblocks a pending Write, then
  // joins the writer: it must be gone before stream and context are.
  auto stop_writer = [&context, &writer] {
    context.TryCancel();
    writer.join();
  };
  v1::AnonymizeBatchResponse response;
  try {
    while (stream->Read(&response)) {
      if (on_response) on_response(response);
    }
  } catch (...) {
    stop_writer();  // cancels the requests still running on the server
    stream->Finish();
    throw;
  }
  // Read returned false: the server sent its status. Collect it before cancelling,
  // which leaves a received status as it is.
  const grpc::Status status = stream->Finish();
  stop_writer();
  if (!status.ok()) throw RpcError(status);
}

v1::ServerInfo Client::GetServerInfo() {
  const auto deadline = std::chrono::system_clock::now() + options_.timeout;
  for (int attempt = 1;; ++attempt) {
    grpc::ClientContext context;
    context.set_deadline(deadline);
    v1::ServerInfo info;
    const grpc::Status status = stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
    if (status.ok()) return info;
    if (!BackoffBeforeRetry(status, attempt, deadline)) throw RpcError(status);
  }
}

bool Client::BackoffBeforeRetry(const grpc::Status& status, int attempt, std::chrono::system_clock::time_point deadline) {
  if (status.error_code() != grpc::StatusCode::UNAVAILABLE || attempt >= options_.max_attempts) return false;
  const std::chrono::milliseconds ceiling =
      std::min<std::chrono::milliseconds>(options_.max_backoff, options_.initial_backoff * (1LL << std::min(attempt - 1, 20)));
  // Jitter, so clients that failed together do not retry together.
  thread_local std::mt19937 rng{std::random_device{}()};
  const auto delay = std::chrono::milliseconds(static_cast<long long>(
      ceiling.count() * std::uniform_real_distribution<double>(0.5, 1.0)(rng)));
  if (std::chrono::system_clock::now() + delay >= deadline) return false;
  std::this_thread::sleep_for(delay);
  return true;
}

}  // namespace masquerade
