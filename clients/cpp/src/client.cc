#include "masquerade/client.h"

#include <condition_variable>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
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

std::optional<std::chrono::milliseconds> Client::RetryInfoDelay(
    const RpcError& error, int attempt, std::optional<std::chrono::system_clock::time_point> deadline) const {
  const auto delay = error.retry_delay();
  if (error.code() != grpc::StatusCode::RESOURCE_EXHAUSTED || !delay.has_value() ||
      attempt >= options_.retry_info_attempts || *delay > kMaxRetryDelay) {
    return std::nullopt;
  }
  if (deadline.has_value() && std::chrono::system_clock::now() + *delay >= *deadline) return std::nullopt;
  return delay;
}

v1::VideoReport Client::AnonymizeVideo(v1::VideoStart start, const std::string& input_path, std::ostream& output,
                                       const ProgressCallback& on_progress) {
  std::error_code error;
  const auto size = std::filesystem::file_size(input_path, error);
  if (error) throw std::runtime_error("cannot read " + input_path + ": " + error.message());
  if (!start.has_size_bytes()) start.set_size_bytes(size);
  if (start.filename().empty()) start.set_filename(std::filesystem::path(input_path).filename().string());
  const auto deadline = std::chrono::system_clock::now() + options_.timeout;
  for (int attempt = 1;; ++attempt) {
    bool started = false;
    try {
      return AnonymizeVideoOnce(start, input_path, output, on_progress, deadline, started);
    } catch (const RpcError& failure) {
      const auto delay = started ? std::nullopt : RetryInfoDelay(failure, attempt, deadline);
      if (!delay) throw;
      std::this_thread::sleep_for(*delay);  // the server's RetryInfo delay
    }
  }
}

v1::VideoReport Client::AnonymizeVideoOnce(const v1::VideoStart& start, const std::string& input_path,
                                           std::ostream& output, const ProgressCallback& on_progress,
                                           std::chrono::system_clock::time_point deadline, bool& started) {
  grpc::ClientContext context;
  Prepare(context, deadline);
  const auto stream = stub_->AnonymizeVideo(&context);
  std::exception_ptr read_error;
  // The upload runs beside the reads below, so flow control cannot deadlock; Write fails once the
  // call has ended (its status says why), and the writer then stops.
  std::thread writer([&] {
    v1::AnonymizeVideoRequest message;
    *message.mutable_start() = start;
    if (!stream->Write(message)) return;
    std::ifstream in(input_path, std::ios::binary);
    std::string buffer(kVideoChunkBytes, '\0');
    std::uint64_t offset = 0;
    while (in) {
      in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
      const auto n = static_cast<std::size_t>(in.gcount());
      if (n == 0) break;
      v1::AnonymizeVideoRequest chunk;
      chunk.mutable_chunk()->set_offset(offset);
      chunk.mutable_chunk()->set_data(buffer.data(), n);
      if (!stream->Write(chunk)) return;
      offset += n;
    }
    if (in.bad() || (!in.eof() && in.fail())) {
      read_error = std::make_exception_ptr(std::runtime_error("reading " + input_path + " failed"));
      context.TryCancel();
      return;
    }
    stream->WritesDone();
  });
  auto stop_writer = [&context, &writer] {
    context.TryCancel();  // a no-op once the call has ended; unblocks a pending Write
    writer.join();
  };
  v1::AnonymizeVideoResponse response;
  v1::VideoReport report;
  bool has_report = false;
  std::uint64_t received = 0;
  try {
    while (stream->Read(&response)) {
      started = true;
      if (response.has_progress()) {
        if (on_progress) on_progress(response.progress());
      } else if (response.has_output()) {
        if (response.output().offset() != received) {
          throw RpcError(grpc::StatusCode::INTERNAL, "output chunk at " + std::to_string(response.output().offset()) +
                                                         ", expected " + std::to_string(received));
        }
        const std::string& data = response.output().data();
        if (!output.write(data.data(), static_cast<std::streamsize>(data.size()))) {
          throw std::runtime_error("writing the anonymized video failed");
        }
        received += data.size();
      } else if (response.has_report()) {
        report = std::move(*response.mutable_report());
        has_report = true;
      }
    }
  } catch (...) {
    stop_writer();  // cancels the call: the server deletes its copy of the upload
    stream->Finish();
    throw;
  }
  const grpc::Status status = stream->Finish();
  stop_writer();
  if (read_error) std::rethrow_exception(read_error);
  if (!status.ok()) throw RpcError(status);
  if (!has_report) throw RpcError(grpc::StatusCode::INTERNAL, "the stream ended without a report");
  if (report.output_bytes() != received) {
    throw RpcError(grpc::StatusCode::INTERNAL, "received " + std::to_string(received) + " bytes, the report says " +
                                                   std::to_string(report.output_bytes()));
  }
  return report;
}

void Client::AnonymizeFrames(const v1::FrameStreamOptions& options, const FrameSource& next_frame,
                             const FrameCallback& on_result, std::optional<std::chrono::milliseconds> timeout) {
  const std::uint32_t window = options.has_window() ? options.window() : kDefaultFrameWindow;
  std::optional<std::chrono::system_clock::time_point> deadline;
  if (timeout) deadline = std::chrono::system_clock::now() + *timeout;
  std::mutex mutex;
  std::deque<v1::FrameRequest> unanswered;  // sent, no result yet: at most `window`
  std::uint64_t next_sequence = 0;
  bool source_done = false;
  for (int attempt = 1;; ++attempt) {
    grpc::ClientContext context;
    if (deadline) {
      Prepare(context, *deadline);
    } else if (!options_.token.empty()) {
      context.AddMetadata("authorization", "Bearer " + options_.token);
    }
    const auto stream = stub_->AnonymizeFrames(&context);
    std::condition_variable changed;
    bool stop = false;
    std::size_t in_flight = 0;
    std::deque<v1::FrameRequest> replay;  // a refused attempt's frames go again, first
    replay.swap(unanswered);
    std::exception_ptr source_error;
    std::thread writer([&] {
      bool first = true;
      while (true) {
        v1::FrameRequest frame;
        {
          std::unique_lock<std::mutex> lock(mutex);
          changed.wait(lock, [&] { return stop || in_flight < window; });
          if (stop) return;
          if (!replay.empty()) {
            frame = std::move(replay.front());
            replay.pop_front();
          } else if (source_done) {
            break;
          } else {
            lock.unlock();  // the source may block (a camera): never under the lock
            bool more = false;
            try {
              more = next_frame(frame);
            } catch (...) {
              source_error = std::current_exception();
              context.TryCancel();
              return;
            }
            lock.lock();
            if (!more) {
              source_done = true;
              break;
            }
            frame.clear_options();
            frame.set_sequence(next_sequence++);
          }
          unanswered.push_back(frame);
          ++in_flight;
        }
        if (first) *frame.mutable_options() = options;
        first = false;
        if (!stream->Write(frame)) return;
      }
      stream->WritesDone();
    });
    auto stop_writer = [&] {
      {
        std::lock_guard<std::mutex> lock(mutex);
        stop = true;
      }
      changed.notify_all();
      context.TryCancel();
      writer.join();
    };
    bool started = false;
    v1::FrameResult result;
    try {
      while (stream->Read(&result)) {
        started = true;
        std::optional<std::uint64_t> expected;
        {
          std::lock_guard<std::mutex> lock(mutex);
          if (!unanswered.empty()) {
            expected = unanswered.front().sequence();
            unanswered.pop_front();
            --in_flight;
          }
        }
        changed.notify_all();
        if (!expected || result.sequence() != *expected) {
          throw RpcError(grpc::StatusCode::INTERNAL, "frame " + std::to_string(result.sequence()) +
                                                         " came back out of order");
        }
        if (on_result) on_result(result);
      }
    } catch (...) {
      stop_writer();
      stream->Finish();
      throw;
    }
    const grpc::Status status = stream->Finish();
    stop_writer();
    if (source_error) std::rethrow_exception(source_error);
    if (status.ok()) return;
    for (auto& frame : replay) unanswered.push_back(std::move(frame));  // refused before they were resent
    const RpcError failure(status);
    const auto delay = started ? std::nullopt : RetryInfoDelay(failure, attempt, deadline);
    if (!delay) throw failure;
    std::this_thread::sleep_for(*delay);  // the server's RetryInfo delay
  }
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
