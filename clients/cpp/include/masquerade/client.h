// A thin C++ client for the Masquerade anonymization server, over the stub that
// the CMake build generates from proto/: one deadline per call, retries of
// UNAVAILABLE by gRPC itself (the channel's service config: the same retryPolicy
// as the Python, TypeScript and Go clients), RESOURCE_EXHAUSTED with RetryInfo
// retried after the server's delay, TLS / mutual TLS and a bearer token from
// ClientOptions, and masquerade::RpcError thrown for every failure.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <ostream>
#include <memory>
#include <optional>
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
  explicit RpcError(const grpc::Status& status);

  grpc::StatusCode code() const noexcept { return code_; }
  // The canonical name of the code, e.g. "INVALID_ARGUMENT".
  const char* code_name() const noexcept;
  // The server's message, e.g. "image: not a decodable JPEG, PNG or WebP".
  const std::string& message() const noexcept { return message_; }
  grpc::Status status() const { return grpc::Status(code_, message_); }
  // How long the server asked the caller to wait before retrying (the google.rpc.RetryInfo
  // detail of RESOURCE_EXHAUSTED: a per-client quota, the queue); empty when it gave none.
  std::optional<std::chrono::milliseconds> retry_delay() const noexcept { return retry_delay_; }

 private:
  grpc::StatusCode code_;
  std::string message_;
  std::optional<std::chrono::milliseconds> retry_delay_;
};

// The RetryInfo delay in a status's details (grpc-status-details-bin, a serialized google.rpc.Status).
std::optional<std::chrono::milliseconds> RetryDelayOf(const grpc::Status& status);

// Upload chunk size of AnonymizeVideo: well under the 64 MiB message limit.
constexpr std::size_t kVideoChunkBytes = 1 << 20;
// Frames in flight of AnonymizeFrames when the options set no window (the server's default too).
constexpr std::uint32_t kDefaultFrameWindow = 4;

// The longest RetryInfo delay a client waits before retrying by itself.
constexpr std::chrono::milliseconds kMaxRetryDelay{30000};

// "INVALID_ARGUMENT" for grpc::StatusCode::INVALID_ARGUMENT, as in the gRPC spec.
const char* CodeName(grpc::StatusCode code) noexcept;

// gRPC's retryPolicy for UNAVAILABLE, the project's one policy in all four clients:
// 4 attempts in all, backoff 0.2 s doubling to at most 5 s (gRPC waits a random time
// up to that), only before any response arrived and never past the call's deadline.
// AnonymizeBatch is not retried: the server may already be running what was sent.
extern const char* const kServiceConfig;

struct ClientOptions {
  // Deadline of each call, retries included.
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};
  // PEM file of the CA that signed the server's certificate; implies TLS.
  std::string ca_file;
  // TLS with gRPC's default roots when ca_file is empty.
  bool tls = false;
  // PEM files of this client's certificate and key, for servers that require mutual TLS.
  std::string cert_file;
  std::string key_file;
  // Sent as "authorization: Bearer <token>" metadata on every call.
  std::string token;
  // Attempts in all for an answer RESOURCE_EXHAUSTED carrying google.rpc.RetryInfo: the
  // client waits the server's delay and sends again (the same in all four clients), only
  // before the first event, never past the deadline, never for a delay over kMaxRetryDelay
  // (then the RpcError, whose retry_delay() holds the advice, is thrown). 1 never retries.
  int retry_info_attempts = 4;
};

// The channel credentials the options ask for: plaintext when ca_file, cert_file
// are empty and tls is false. Throws std::invalid_argument for an unreadable file.
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentialsFor(const ClientOptions& options);

class Client {
 public:
  using EventCallback = std::function<void(const v1::AnonymizeEvent&)>;
  using BatchCallback = std::function<void(const v1::AnonymizeBatchResponse&)>;

  // TLS and the token as options say; plaintext by default (a server on loopback).
  // Explicit credentials override the options' TLS files.
  explicit Client(const std::string& target, ClientOptions options = {},
                  std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

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

  using ProgressCallback = std::function<void(const v1::VideoProgress&)>;
  // Fills `frame` with the next live frame's pixels (encoded or raw) and, if it has one, its
  // capture timestamp; returns false when there are no more. The client sets the sequence.
  using FrameSource = std::function<bool(v1::FrameRequest& frame)>;
  using FrameCallback = std::function<void(const v1::FrameResult&)>;

  // Sends the video file at input_path through AnonymizeVideo: `start` (the options;
  // filename and size_bytes are filled in from the file when unset), then the file in
  // chunks, read as flow control lets them go (a writer thread), so a large clip is never
  // held in memory. Progress events go to on_progress; the anonymized file is written to
  // `output` as it arrives (in order; each chunk's offset is checked); returns the final
  // report. One deadline (options.timeout) covers upload, processing and download.
  // RESOURCE_EXHAUSTED with RetryInfo before any response is retried after the server's
  // delay, as for images (the upload starts again). Throws RpcError; std::runtime_error
  // when the file cannot be read or `output` fails (the call is cancelled first, so the
  // server deletes its copy); an exception from on_progress cancels the call and propagates.
  v1::VideoReport AnonymizeVideo(v1::VideoStart start, const std::string& input_path, std::ostream& output,
                                 const ProgressCallback& on_progress = {});

  // Streams live frames through AnonymizeFrames: `options` go in the first message; frames
  // come from next_frame, called on a writer thread only while fewer than options.window
  // (default 4) frames are unanswered, so a slow on_result slows the reading of frames and
  // nothing queues without bound. on_result gets every FrameResult in the order sent, on the
  // calling thread (a result out of order is an INTERNAL RpcError). Sequence numbers are
  // 0, 1, 2...; set a frame's timestamp to its capture time (seconds, one clock per stream) when
  // known, else leave it 0 and the server times the frame itself. No deadline unless `timeout` is given:
  // a live stream runs as long as its frames do. A stream refused RESOURCE_EXHAUSTED with
  // RetryInfo before any result (the per-client quota) is reopened after the server's delay,
  // resending the frames it held; a stream ended later (a frame over the quota, a drain's
  // UNAVAILABLE) throws RpcError and the caller reconnects. An exception from next_frame or
  // on_result cancels the stream and propagates.
  void AnonymizeFrames(const v1::FrameStreamOptions& options, const FrameSource& next_frame,
                       const FrameCallback& on_result,
                       std::optional<std::chrono::milliseconds> timeout = std::nullopt);

  // Version, methods available, models loaded, limits and defaults.
  v1::ServerInfo GetServerInfo();

  // The generated stub, for calls this wrapper does not cover.
  v1::Anonymizer::Stub& raw() { return *stub_; }

 private:
  // Sets the deadline and the token on a call's context.
  void Prepare(grpc::ClientContext& context) const;
  void Prepare(grpc::ClientContext& context, std::chrono::system_clock::time_point deadline) const;
  // One AnonymizeStream call; sets started once an event arrived.
  v1::AnonymizeResponse AnonymizeStreamOnce(const v1::AnonymizeRequest& request, const EventCallback& on_event,
                                            std::chrono::system_clock::time_point deadline, bool& started);
  // One AnonymizeVideo call; sets started once a response arrived.
  v1::VideoReport AnonymizeVideoOnce(const v1::VideoStart& start, const std::string& input_path, std::ostream& output,
                                     const ProgressCallback& on_progress,
                                     std::chrono::system_clock::time_point deadline, bool& started);
  // Whether to retry a call that failed with `error` on `attempt` before any response, and after how long.
  std::optional<std::chrono::milliseconds> RetryInfoDelay(
      const RpcError& error, int attempt, std::optional<std::chrono::system_clock::time_point> deadline) const;

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Anonymizer::Stub> stub_;
};

}  // namespace masquerade
