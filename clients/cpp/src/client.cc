#include "masquerade/client.h"

#include <fstream>
#include <iterator>
#include <stdexcept>
#include <thread>

#include <google/protobuf/any.pb.h>
#include <google/protobuf/duration.pb.h>
#include <google/protobuf/unknown_field_set.h>

namespace masquerade {

RpcError::RpcError(grpc::StatusCode code, const std::string& message)
    : std::runtime_error(std::string(CodeName(code)) + ": " + message), code_(code), message_(message) {}

RpcError::RpcError(const grpc::Status& status) : RpcError(status.error_code(), status.error_message()) {
  retry_delay_ = RetryDelayOf(status);
}

const char* RpcError::code_name() const noexcept { return CodeName(code_); }

namespace {

// The length-delimited values of field `number` in a serialized message, read without its schema.
std::vector<std::string> FieldsOf(const std::string& bytes, int number) {
  google::protobuf::UnknownFieldSet fields;
  std::vector<std::string> found;
  if (!fields.ParseFromString(bytes)) return found;
  for (int i = 0; i < fields.field_count(); ++i) {
    const auto& field = fields.field(i);
    if (field.number() == number && field.type() == google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) {
      found.push_back(field.length_delimited());
    }
  }
  return found;
}

}  // namespace

std::optional<std::chrono::milliseconds> RetryDelayOf(const grpc::Status& status) {
  // google.rpc.Status {3: repeated google.protobuf.Any details}; RetryInfo {1: google.protobuf.Duration}.
  for (const std::string& detail : FieldsOf(status.error_details(), 3)) {
    google::protobuf::Any any;
    if (!any.ParseFromString(detail) || any.type_url() != "type.googleapis.com/google.rpc.RetryInfo") continue;
    google::protobuf::Duration delay;
    const auto durations = FieldsOf(any.value(), 1);
    if (!durations.empty() && !delay.ParseFromString(durations.front())) return std::nullopt;
    const auto ms = std::chrono::milliseconds(delay.seconds() * 1000 + delay.nanos() / 1000000);
    return ms.count() < 0 ? std::chrono::milliseconds(0) : ms;
  }
  return std::nullopt;
}

const char* CodeName(grpc::StatusCode code) noexcept {
  static const char* const kNames[] = {
      "OK",        "CANCELLED",         "UNKNOWN",           "INVALID_ARGUMENT",  "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",      "UNAVAILABLE",       "DATA_LOSS",         "UNAUTHENTICATED",
  };
  const int index = static_cast<int>(code);
  return index >= 0 && index < static_cast<int>(std::size(kNames)) ? kNames[index] : "UNKNOWN";
}

const char* const kServiceConfig = R"({"methodConfig": [
  {"name": [{"service": "masquerade.v1.Anonymizer"}],
   "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "5s", "backoffMultiplier": 2,
                   "retryableStatusCodes": ["UNAVAILABLE"]}},
  {"name": [{"service": "masquerade.v1.Anonymizer", "method": "AnonymizeBatch"}]}]})";

namespace {

std::string ReadFile(const char* what, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument(std::string(what) + ": cannot read " + path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentialsFor(const ClientOptions& options) {
  if (options.cert_file.empty() != options.key_file.empty()) {
    throw std::invalid_argument("cert_file and key_file: give both (mutual TLS) or neither");
  }
  if (options.ca_file.empty() && options.cert_file.empty() && !options.tls) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  if (!options.ca_file.empty()) ssl.pem_root_certs = ReadFile("ca_file", options.ca_file);
  if (!options.cert_file.empty()) {
    ssl.pem_cert_chain = ReadFile("cert_file", options.cert_file);
    ssl.pem_private_key = ReadFile("key_file", options.key_file);
  }
  return grpc::SslCredentials(ssl);
}

Client::Client(const std::string& target, ClientOptions options, std::shared_ptr<grpc::ChannelCredentials> credentials)
    : options_(std::move(options)) {
  if (!credentials) credentials = ChannelCredentialsFor(options_);
  grpc::ChannelArguments args;
  // Results are whole encoded images, larger than gRPC's 4 MiB default; 64 MiB matches the server.
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 1);
  args.SetServiceConfigJSON(kServiceConfig);
  channel_ = grpc::CreateCustomChannel(target, std::move(credentials), args);
  stub_ = v1::Anonymizer::NewStub(channel_);
}

void Client::Prepare(grpc::ClientContext& context) const {
  Prepare(context, std::chrono::system_clock::now() + options_.timeout);
}

void Client::Prepare(grpc::ClientContext& context, std::chrono::system_clock::time_point deadline) const {
  context.set_deadline(deadline);
  if (!options_.token.empty()) context.AddMetadata("authorization", "Bearer " + options_.token);
}

v1::AnonymizeResponse Client::AnonymizeStream(const v1::AnonymizeRequest& request, const EventCallback& on_event) {
  const auto deadline = std::chrono::system_clock::now() + options_.timeout;
  for (int attempt = 1;; ++attempt) {
    bool started = false;
    try {
      return AnonymizeStreamOnce(request, on_event, deadline, started);
    } catch (const RpcError& error) {
      const auto delay = error.retry_delay();
      const bool retry = !started && error.code() == grpc::StatusCode::RESOURCE_EXHAUSTED && delay.has_value() &&
                         attempt < options_.retry_info_attempts && *delay <= kMaxRetryDelay &&
                         std::chrono::system_clock::now() + *delay < deadline;
      if (!retry) throw;
      std::this_thread::sleep_for(*delay);  // the server's RetryInfo delay
    }
  }
}

v1::AnonymizeResponse Client::AnonymizeStreamOnce(const v1::AnonymizeRequest& request, const EventCallback& on_event,
                                                  std::chrono::system_clock::time_point deadline, bool& started) {
  grpc::ClientContext context;
  Prepare(context, deadline);
  auto reader = stub_->AnonymizeStream(&context, request);
  v1::AnonymizeEvent event;
  v1::AnonymizeResponse result;
  bool has_result = false;
  while (reader->Read(&event)) {
    started = true;
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
  if (!status.ok()) throw RpcError(status);
  if (!has_result) throw RpcError(grpc::StatusCode::INTERNAL, "the stream ended without a result event");
  return result;
}

void Client::AnonymizeBatch(const std::vector<v1::AnonymizeRequest>& requests, const BatchCallback& on_response) {
  grpc::ClientContext context;
  Prepare(context);
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
  grpc::ClientContext context;
  Prepare(context);
  v1::ServerInfo info;
  const grpc::Status status = stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
  if (!status.ok()) throw RpcError(status);
  return info;
}

}  // namespace masquerade
