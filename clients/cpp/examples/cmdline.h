// What the example commands (masquerade-anonymize, masquerade-video) share: the
// command-line loop with the connection options (--server, --method, --timeout,
// TLS, --token-file, --help), number parsing, the token file, and one mapping from
// an error to a message and an exit code.
// Exit codes: 0 done; 2 bad command line (or a file it names cannot be used);
// 3 INVALID_ARGUMENT (the gRPC code number); 1 any other failure.
#ifndef MASQUERADE_EXAMPLES_CMDLINE_H_
#define MASQUERADE_EXAMPLES_CMDLINE_H_

#include <functional>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "masquerade/client.h"

namespace masquerade::cmdline {

// A bad command line: main prints it with the usage and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The options every example takes.
struct CommonArgs {
  explicit CommonArgs(double default_timeout_seconds) : timeout_seconds(default_timeout_seconds) {}
  std::string server;
  v1::Method method = v1::METHOD_UNSPECIFIED;
  double timeout_seconds;
  bool tls = false;
  std::string tls_ca, tls_cert, tls_key, token_file;
};

// An example's own option: returns false for a flag it does not know. `value` takes
// the flag's value (--flag=value or the next argument) and throws UsageError when none.
using OwnOption = std::function<bool(const std::string& flag, const std::function<std::string()>& value)>;

// Parses argv into `common` and, through `own`, the example's options; prints `usage`
// and exits 0 on -h/--help. Returns the positional arguments. Throws UsageError.
std::vector<std::string> ParseCommandLine(int argc, char** argv, const char* usage, CommonArgs& common,
                                          const OwnOption& own);

// An integer >= minimum; `expected` names what the message asks for (default "an integer >= minimum").
unsigned ParseUnsigned(const std::string& flag, const std::string& text, unsigned minimum,
                       const std::string& expected = "");

// A number > 0 (as std::stod reads it); the message asks for "a positive number" + `unit`.
double ParsePositive(const std::string& flag, const std::string& text, const std::string& unit = "");

std::string ReadFile(const std::string& path);

// The client options and credentials the common options ask for (reads the token and PEM
// files now). Throws on an unusable file: main prints it and exits 2.
struct Connection {
  ClientOptions options;
  std::shared_ptr<grpc::ChannelCredentials> credentials;
};
Connection ConnectionFor(const CommonArgs& common);

// Runs `body` and returns its exit code, or prints the error it throws and returns 3 for
// INVALID_ARGUMENT, 1 for anything else.
int ExitCodeOf(const std::function<int()>& body);

// An example's main: parses with `parse` (a UsageError: message + usage, exit 2), connects
// (an unusable file: exit 2), then runs `run` through ExitCodeOf.
template <typename Args>
int Main(int argc, char** argv, const char* usage, Args (*parse)(int, char**),
         int (*run)(const Args&, const Connection&)) {
  Args args;
  try {
    args = parse(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "error: " << e.what() << "\n" << usage << "\n";
    return 2;
  }
  Connection connection;
  try {
    connection = ConnectionFor(args);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return ExitCodeOf([&] { return run(args, connection); });
}

}  // namespace masquerade::cmdline

#endif  // MASQUERADE_EXAMPLES_CMDLINE_H_
